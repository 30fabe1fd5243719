"""Safe, strict checkpoint loading and one-line errors for bad input."""
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from safetensors.torch import save_file

from ldm.modules.encoders.modules import FrozenCLIPEmbedder
from ldm.util import (UsageError, instantiate_from_config, load_checkpoint_file, load_model_from_config,
                      load_state_dict_strict, state_dict_from_checkpoint)

from conftest import call_script, one_line_error


class Payload:
    """Unpickling this runs a shell command: a stand-in for a malicious checkpoint."""

    def __init__(self, function, marker):
        self.function, self.marker = function, marker

    def __reduce__(self):
        return self.function, (f"touch {self.marker}",)


def test_lightning_checkpoint_loads_with_inert_stand_ins(small_model, tmp_path):
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": small_model.state_dict(), "global_step": 7,
                "callbacks": {ModelCheckpoint: {"best_model_score": np.float64(0.25)}}}, path)
    checkpoint = load_checkpoint_file(path)
    assert checkpoint["global_step"] == 7
    assert state_dict_from_checkpoint(checkpoint).keys() == small_model.state_dict().keys()


@pytest.mark.parametrize("function", [os.system, subprocess.getoutput])
def test_malicious_pickle_never_runs(small_model, tmp_path, function):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": small_model.state_dict(), "extra": Payload(function, marker)}, path)
    try:
        state_dict_from_checkpoint(load_checkpoint_file(path))
    except UsageError as error:
        assert "could not be loaded safely" in str(error)
    assert not marker.exists()


def test_safetensors_round_trip(small_model, small_config, tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in small_model.state_dict().items()}, path)
    model = load_model_from_config(small_config, path)
    loaded = model.state_dict()
    for key, value in small_model.state_dict().items():
        assert torch.equal(loaded[key], value)


def test_model_ema_and_legacy_keys_are_ignored_on_purpose(small_model):
    state_dict = dict(small_model.state_dict())
    state_dict["model_ema.decay"] = torch.tensor(0.999)
    state_dict["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    load_state_dict_strict(small_model, state_dict)


def test_ema_weights_load_into_a_model_that_keeps_ema(small_config, small_model):
    config = OmegaConf.merge(small_config, {"model": {"params": {"use_ema": True}}})
    with_ema = instantiate_from_config(config.model)
    state_dict = with_ema.state_dict()
    state_dict = {k: v + 1 if k.startswith("model_ema.") and v.is_floating_point() else v
                  for k, v in state_dict.items()}
    fresh = instantiate_from_config(config.model)
    load_state_dict_strict(fresh, state_dict)
    loaded = fresh.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state_dict.items())


def test_mismatched_checkpoint_names_keys_and_shapes(small_model, small_config):
    wider = OmegaConf.merge(small_config, {"model": {"params": {"unet_config": {"params": {"model_channels": 64}}}}})
    model = instantiate_from_config(wider.model)
    with pytest.raises(UsageError, match=r"shape mismatches \(first: model\.diffusion_model\.time_embed\.0\.weight"):
        load_state_dict_strict(model, small_model.state_dict())
    state_dict = dict(small_model.state_dict())
    state_dict.pop("model.diffusion_model.out.2.bias")
    state_dict["model.diffusion_model.extra.weight"] = torch.zeros(1)
    with pytest.raises(UsageError, match=r"1 keys missing \(first: model\.diffusion_model\.out\.2\.bias\).*"
                                         r"1 unexpected keys \(first: model\.diffusion_model\.extra\.weight\)"):
        load_state_dict_strict(small_model, state_dict)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("this is not a checkpoint")
    with pytest.raises(UsageError, match="is not a PyTorch checkpoint"):
        load_checkpoint_file(path)
    with pytest.raises(UsageError, match="not found"):
        load_checkpoint_file(tmp_path / "missing.ckpt")


def test_unimportable_target():
    with pytest.raises(UsageError, match="config target 'ldm.nothing.Here' cannot be imported"):
        instantiate_from_config({"target": "ldm.nothing.Here"})


def test_missing_text_encoder_folder(tmp_path):
    with pytest.raises(UsageError, match="has no config.json: put the CLIP text encoder's config.json there"):
        FrozenCLIPEmbedder(version=str(tmp_path / "nowhere"))


def test_hub_id_maps_to_local_folder():
    embedder = FrozenCLIPEmbedder(version="openai/clip-vit-large-patch14")
    assert embedder.transformer.config.hidden_size == 768


def test_convert_script_bad_input(small_config_path, small_ckpt, tmp_path):
    out = tmp_path / "out"
    bad_target = tmp_path / "bad.yaml"
    bad_target.write_text("model:\n  target: ldm.models.nothing.Model\n")
    assert "cannot be imported" in one_line_error(call_script(
        "train-scripts/convertModels.py", "--config_path", bad_target, "--ckpt_path", small_ckpt,
        "--diffusers_path", out))
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"\x00garbage")
    assert "is not a PyTorch checkpoint" in one_line_error(call_script(
        "train-scripts/convertModels.py", "--config_path", small_config_path, "--ckpt_path", junk,
        "--diffusers_path", out))
    wrong = tmp_path / "wrong.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}}, wrong)
    assert "keys missing" in one_line_error(call_script(
        "train-scripts/convertModels.py", "--config_path", small_config_path, "--ckpt_path", wrong,
        "--diffusers_path", out))
    assert not out.exists()


@pytest.mark.slow
def test_convert_script_writes_a_pipeline_that_loads_offline(small_model, small_config_path, small_ckpt, tmp_path):
    from diffusers import StableDiffusionPipeline
    out = tmp_path / "diffusers"
    result = call_script("train-scripts/convertModels.py", "--config_path", small_config_path, "--ckpt_path",
                        small_ckpt, "--diffusers_path", out)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["steps_offset"] == 1
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([400])
    with torch.no_grad():
        cond = small_model.get_learned_conditioning(["a green moon"])
        ours = small_model.apply_model(x, t, cond)
        theirs = pipe.unet(x, t, encoder_hidden_states=pipe.encode_prompt(
            "a green moon", "cpu", 1, False)[0]).sample
    assert (ours - theirs).abs().max() <= 1e-4
    assert "already exists" in one_line_error(call_script(
        "train-scripts/convertModels.py", "--config_path", small_config_path, "--ckpt_path", small_ckpt,
        "--diffusers_path", out))
