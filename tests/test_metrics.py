"""Quality metrics: the tiny-sd feature distance on real evaluator features, CLIP score through
torchmetrics with a real (small, random) CLIP model, and the one-line errors when weights are absent."""
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ldm.data.concepts import render, sample_attributes
from ldm.metrics import CLIP_SCORE_MODEL, INCEPTION_WEIGHTS, clip_score, frechet_distance, inception_fid_metric
from ldm.paths import CLIP_TOKENIZER_DIR
from ldm.util import UsageError

from conftest import SMALL_CLIP, call_script, one_line_error


def _render_folder(folder, count, seed, only=None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        attributes = only or sample_attributes(rng)
        Image.fromarray(render(*attributes, seed=(seed, i))).save(folder / f"{i}_0.png")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    return {"a": _render_folder(root / "a", 150, seed=1), "b": _render_folder(root / "b", 150, seed=2),
            "circles": _render_folder(root / "circles", 150, seed=3, only=("circle", "red", "none"))}


def test_tiny_sd_feature_distance_separates_distributions(folders, tmp_path):
    def fid(real, fake):
        save = tmp_path / f"{real}-{fake}.json"
        result = call_script("eval-scripts/fid.py", "--features", "tiny-sd", "--real_folder", folders[real],
                            "--fake_folder", folders[fake], "--save_path", save)
        assert result.returncode == 0, result.stderr
        record = json.loads(save.read_text())
        assert record["real_images"] == record["fake_images"] == 150
        return record["fid"]

    same, shifted = fid("a", "b"), fid("a", "circles")
    assert 0 <= same < shifted / 5, (same, shifted)
    assert fid("a", "a") == pytest.approx(0, abs=1e-3 * shifted)


def test_inception_fid_without_weights_is_one_line(folders, tmp_path):
    if INCEPTION_WEIGHTS.is_file():
        pytest.skip("Inception weights are present; the missing-weights message cannot be shown")
    with pytest.raises(UsageError, match="Inception v3 weights"):
        inception_fid_metric()
    result = call_script("eval-scripts/fid.py", "--real_folder", folders["a"], "--fake_folder", folders["b"])
    assert "put it there or pass --inception_weights" in one_line_error(result)


@pytest.mark.skipif(not INCEPTION_WEIGHTS.is_file(), reason=f"Inception weights not in {INCEPTION_WEIGHTS}")
def test_inception_fid_with_real_weights(folders):
    same = frechet_distance(inception_fid_metric(), folders["a"], folders["b"], progress=False)[0]
    shifted = frechet_distance(inception_fid_metric(), folders["a"], folders["circles"], progress=False)[0]
    assert same < shifted


@pytest.fixture(scope="module")
def small_clip_dir(tmp_path_factory):
    """A real CLIPModel at small width with random weights, the real CLIP tokenizer and processor."""
    import shutil
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    folder = tmp_path_factory.mktemp("clip-score")
    text = {k: v for k, v in SMALL_CLIP.items() if k not in ("architectures", "model_type")}
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8, "projection_dim": 64}
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    for name in CLIP_TOKENIZER_DIR.iterdir():
        shutil.copy(name, folder / name.name)
    return folder


def test_clip_score_through_torchmetrics(folders, small_clip_dir, tmp_path):
    import torch
    from transformers import CLIPModel, CLIPProcessor
    prompts = {i: f"a picture number {i}" for i in range(150)}
    score = clip_score(folders["a"], prompts, small_clip_dir, batch_size=64, progress=False)
    # the definition, straight from transformers: 100 * cosine of the projected embeddings, averaged, the
    # mean floored at 0 (as torchmetrics does; with trained CLIP the cosines are positive anyway)
    clip, processor = CLIPModel.from_pretrained(small_clip_dir), CLIPProcessor.from_pretrained(small_clip_dir)
    images = [torch.from_numpy(np.asarray(Image.open(folders["a"] / f"{i}_0.png"))).permute(2, 0, 1)
              for i in range(150)]
    with torch.no_grad():
        out = clip(**processor(text=[prompts[i] for i in range(150)], images=images, return_tensors="pt",
                               padding=True))
    expected = (100 * torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)).mean().clamp(min=0)
    assert score == pytest.approx(float(expected), rel=1e-4) and 0 <= score <= 100

    csv = tmp_path / "prompts.csv"
    pd.DataFrame({"prompt": list(prompts.values()), "evaluation_seed": 0, "case_number": list(prompts)}).to_csv(csv)
    result = call_script("eval-scripts/clip-score.py", "--folder", folders["a"], "--prompts_path", csv,
                        "--clip_model", small_clip_dir)
    assert result.returncode == 0 and f"CLIP score {score:.2f}" in result.stdout, result.stderr


def test_clip_score_without_weights_is_one_line(folders, tmp_path):
    if (CLIP_SCORE_MODEL / "config.json").is_file():
        pytest.skip("a CLIP model is present in models/clip-score")
    csv = tmp_path / "prompts.csv"
    pd.DataFrame({"prompt": ["a star"], "evaluation_seed": [0], "case_number": [0]}).to_csv(csv, index=False)
    result = call_script("eval-scripts/clip-score.py", "--folder", folders["a"], "--prompts_path", csv)
    assert "openai/clip-vit-large-patch14" in one_line_error(result)
