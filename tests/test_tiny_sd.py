"""The shipped tiny-sd model and evaluator: format, size, accuracy, and the main job end to end."""
import importlib.util

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ldm.data.prompt_sets import all_concepts
from ldm.evaluator import check_autoencoder, heldout_accuracy, load_evaluator
from ldm.loading import load_model
from ldm.modules.attention import SpatialTransformer
from ldm.paths import CLIP_TOKENIZER_DIR, REPO_ROOT, TINY_SD_DIR
from ldm.text_geometry import null_space, protected_prompts, stacked_embeddings, text_side_report
from ldm.util import load_checkpoint_file, load_model_from_config, state_dict_from_checkpoint

from conftest import call_script, one_line_error

TINY = TINY_SD_DIR
HELDOUT_ACCURACY = 0.98  # per head, on fresh renders and on their tiny-sd reconstructions
QUALITY_BARS = {"object": 0.95, "color": 0.95, "style": 0.90}


def test_shipped_files_are_compvis_format_and_small():
    files = [p for p in TINY.rglob("*") if p.is_file()] + list(CLIP_TOKENIZER_DIR.iterdir())
    assert sum(p.stat().st_size for p in files) <= 50 * 2**20
    state_dict = state_dict_from_checkpoint(load_checkpoint_file(TINY / "model.ckpt"))
    prefixes = {k.split(".")[0] for k in state_dict}
    assert {"model", "first_stage_model", "cond_stage_model"} <= prefixes
    assert any(k.startswith("model.diffusion_model.input_blocks.") and ".attn2.to_k." in k for k in state_dict)
    model = load_model_from_config(TINY / "config.yaml", TINY / "model.ckpt")
    assert 0.1 < float(model.scale_factor) < 10  # computed from the data, as CompVis' scale_by_std
    sizes = set()
    for block in model.model.diffusion_model.modules():
        if isinstance(block, SpatialTransformer):
            block.register_forward_hook(lambda module, args, out: sizes.add(out.shape[-1]))
    with torch.no_grad():
        model.apply_model(torch.randn(1, 4, 16, 16), torch.tensor([500]), model.get_learned_conditioning(["a star"]))
    assert len(sizes) >= 2  # cross-attention at two or more resolutions


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-sd").model


def test_evaluator_is_accurate_on_fresh_images():
    accuracy = heldout_accuracy(load_evaluator(TINY / "evaluator.safetensors"), count=300, seed=777)
    assert min(accuracy.values()) >= HELDOUT_ACCURACY, accuracy


def test_evaluator_was_trained_on_tiny_sds_autoencoder(tiny):
    assert check_autoencoder(load_evaluator(TINY / "evaluator.safetensors"), tiny.first_stage_model)


@pytest.mark.slow  # a measurement of the shipped files; heldout_accuracy itself runs by default (fresh images)
def test_evaluator_reads_tiny_sd_reconstructions(tiny):
    """Every generated image passes through tiny-sd's decoder; the evaluator was trained to see
    through its blur, so a render's reconstruction keeps its labels."""
    evaluator = load_evaluator(TINY / "evaluator.safetensors")
    assert check_autoencoder(evaluator, tiny.first_stage_model)  # trained on this very autoencoder
    accuracy = heldout_accuracy(evaluator, count=300, seed=778, first_stage=tiny.first_stage_model)
    assert min(accuracy.values()) >= HELDOUT_ACCURACY, accuracy


def test_text_encoder_is_wide_and_leaves_sepce_a_null_space(tiny):
    """SepCE erases in the null space of the protected prompts' embeddings (the empty prompt and every
    other value of the concept's attribute, every token): it needs room there for every concept."""
    report = text_side_report(tiny, all_concepts()).set_index("concept")
    assert (report["width"] >= 256).all()
    assert (report["null_space_dim"] >= 100).all(), report["null_space_dim"].to_dict()


def test_null_space_is_orthogonal_to_the_protected_embeddings(tiny):
    embeddings = stacked_embeddings(tiny, protected_prompts("Van Gogh")).double()
    basis = null_space(embeddings)
    assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1], dtype=torch.float64), atol=1e-8)
    assert (embeddings @ basis).abs().max() <= 1e-4 * embeddings.abs().max()


def test_main_job_generates_then_classifies(tmp_path):
    prompts = tmp_path / "quality-head.csv"
    pd.read_csv(REPO_ROOT / "data/tiny-sd/quality.csv").head(4).to_csv(prompts, index=False)
    generated = call_script("eval-scripts/generate-images.py", "--prompts_path", prompts, "--save_path",
                           tmp_path / "images", "--num_samples", 2, "--ddim_steps", 20, "--device", "cpu")
    assert generated.returncode == 0, generated.stderr
    folder = tmp_path / "images" / "tiny-sd"
    assert not np.array_equal(np.asarray(Image.open(folder / "0_0.png")), np.asarray(Image.open(folder / "0_1.png")))
    result = tmp_path / "classes.csv"
    classified = call_script("eval-scripts/imageclassify.py", "--folder_path", tmp_path / "images" / "tiny-sd",
                            "--prompts_path", prompts, "--save_path", result, "--device", "cpu")
    assert classified.returncode == 0, classified.stderr
    table = pd.read_csv(result)
    assert len(table) == 8 and {"case_number", "image", "pred_object", "pred_color", "pred_style",
                                "prob_object", "prob_color", "prob_style"} <= set(table.columns)
    accuracy = pd.read_csv(tmp_path / "classes_accuracy.csv")
    assert accuracy["attribute"].tolist() == ["object", "color", "style"]
    assert "accuracy" in classified.stdout
    assert "seeds: 100.0% of 4 prompts have all their images distinct" in classified.stdout


def test_seed_diversity_finds_repeated_images(tmp_path):
    from ldm.evaluation import list_images, seed_diversity
    rng = np.random.default_rng(0)
    same = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for i in range(3):  # case 0: three different images; case 1: the same image twice and one other
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"0_{i}.png")
        Image.fromarray(same if i < 2 else 255 - same).save(tmp_path / f"1_{i}.png")
    Image.fromarray(same).save(tmp_path / "2_0.png")  # a single image says nothing about seeds
    table = seed_diversity(tmp_path, list_images(tmp_path)).set_index("case_number")
    assert table["all_distinct"].to_dict() == {0: True, 1: False}
    assert 80 < table.loc[0, "mean_pair_difference"] < 90  # uniform noise pairs: 255/3 apart on average


def test_imageclassify_bad_input(tmp_path):
    result = call_script("eval-scripts/imageclassify.py", "--folder_path", tmp_path, "--save_path",
                        tmp_path / "x.csv", "--device", "cpu")
    assert "holds no images" in one_line_error(result)


def test_resnet50_says_how_to_provide_it(tmp_path):
    (tmp_path / "0_0.png").write_bytes((TINY / "samples.png").read_bytes())
    result = call_script("eval-scripts/imageclassify.py", "--folder_path", tmp_path, "--save_path",
                        tmp_path / "x.csv", "--classifier", "resnet50", "--device", "cpu")
    if importlib.util.find_spec("torchvision") is None:
        assert result.returncode == 2 and "needs torchvision" in result.stderr
        return
    if result.returncode == 2:
        assert "ResNet-50 ImageNet weights not found: put resnet50-0676ba61.pth" in result.stderr
    else:
        assert "category_top1" in pd.read_csv(tmp_path / "x.csv").columns


@pytest.mark.slow
@pytest.mark.parametrize("csv", ["quality.csv", "quality-other-templates.csv"])
def test_quality_table(tmp_path, csv):
    """The README's quality table: 64 prompts x 5 images, the generator's default settings. Each
    attribute is checked and reported on its own."""
    prompts = REPO_ROOT / "data/tiny-sd" / csv
    generated = call_script("eval-scripts/generate-images.py", "--prompts_path", prompts, "--save_path", tmp_path,
                           "--num_samples", 5, "--batch_size", 64, "--device", "cpu")
    assert generated.returncode == 0, generated.stderr
    classified = call_script("eval-scripts/imageclassify.py", "--folder_path", tmp_path / "tiny-sd", "--prompts_path",
                            prompts, "--save_path", tmp_path / "classes.csv")
    assert classified.returncode == 0, classified.stderr
    accuracy = pd.read_csv(tmp_path / "classes_accuracy.csv").set_index("attribute")
    failures = [f"{name} {accuracy.loc[name, 'accuracy']:.1%} (95% CI {accuracy.loc[name, 'ci95_low']:.1%}-"
                f"{accuracy.loc[name, 'ci95_high']:.1%}) < {bar:.0%}"
                for name, bar in QUALITY_BARS.items() if accuracy.loc[name, "accuracy"] < bar]
    assert not failures, "; ".join(failures)
    assert "seeds: 100.0% of 64 prompts have all their images distinct" in classified.stdout


@pytest.mark.slow
def test_text_geometry_script_reports_every_concept(tmp_path):
    result = call_script("eval-scripts/text-geometry.py", "--save_path", tmp_path / "geometry.csv")
    assert result.returncode == 0, result.stderr
    report = pd.read_csv(tmp_path / "geometry.csv")
    assert sorted(report["concept"]) == sorted(all_concepts())
    assert report["direction_cosine_mean"].between(-1, 1).all() and (report["null_space_dim"] >= 100).all()
    assert len(pd.read_csv(tmp_path / "geometry-templates.csv")) > len(report)
