"""Shared fixtures: a reduced-width model with SD v1's exact structure, filled with random weights."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.paths import REPO_ROOT
from ldm.util import instantiate_from_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SD_CONFIG = REPO_ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"
SHARED = REPO_ROOT.parent / "shared"

SMALL_CLIP = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": 64,
    "intermediate_size": 128, "projection_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "pad_token_id": 1,
    "bos_token_id": 0, "eos_token_id": 2,
}


def small_sd_config(text_encoder_dir):
    """SD v1's config with every width reduced (channels 32..128, 8 heads, 8x8 latents, 64 px)."""
    config = OmegaConf.load(SD_CONFIG)
    params = config.model.params
    params.image_size = 8
    params.unet_config.params.update(model_channels=32, context_dim=SMALL_CLIP["hidden_size"], use_checkpoint=False)
    params.first_stage_config.params.ddconfig.update(ch=32, resolution=64)
    params.cond_stage_config.params.version = str(text_encoder_dir)
    return config


def sd_v1_structure_model(folder):
    """SD v1's structure (16 cross-attention layers) with a 768-wide, 77-token text encoder, random weights."""
    (Path(folder) / "config.json").write_text(json.dumps({**SMALL_CLIP, "hidden_size": 768, "projection_dim": 768,
                                                          "num_attention_heads": 12, "intermediate_size": 1024}))
    config = small_sd_config(folder)
    config.model.params.unet_config.params.context_dim = 768
    return randomize_(instantiate_from_config(config.model)).eval()


def randomize_(module, seed=0):
    """Fill every parameter with seeded random values of a sensible scale (zero-initialised layers too)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            if param.dim() > 1:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return module


@pytest.fixture(scope="session")
def small_text_encoder_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip-small")
    (folder / "config.json").write_text(json.dumps(SMALL_CLIP))
    return folder


@pytest.fixture(scope="session")
def small_config(small_text_encoder_dir):
    return small_sd_config(small_text_encoder_dir)


@pytest.fixture(scope="session")
def small_config_path(small_config, tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "small-sd.yaml"
    OmegaConf.save(small_config, path)
    return path


@pytest.fixture(scope="session")
def small_model(small_config):
    """A LatentDiffusion in SD v1's structure at reduced width with random weights (fp32, eval)."""
    torch.manual_seed(0)
    model = instantiate_from_config(small_config.model)
    return randomize_(model, seed=1).eval()


@pytest.fixture(scope="session")
def small_ckpt(small_model, tmp_path_factory):
    """The small model saved as a CompVis checkpoint (Lightning layout)."""
    path = tmp_path_factory.mktemp("ckpt") / "small.ckpt"
    torch.save({"state_dict": small_model.state_dict(), "global_step": 0}, path)
    return path


TINY = REPO_ROOT / "models" / "tiny-sd"


@pytest.fixture(scope="module")
def tiny_state():
    """tiny-sd's weights, loaded once per test module."""
    from ldm.util import load_model_from_config
    model = load_model_from_config(TINY / "config.yaml", TINY / "model.ckpt")
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def tiny(tiny_state):
    """A fresh tiny-sd model (the module's loaded weights copied in)."""
    model = instantiate_from_config(OmegaConf.load(TINY / "config.yaml").model)
    model.load_state_dict(tiny_state)
    return model.eval()


def run_script(script, *args, cwd=REPO_ROOT):
    """Run a project script in a fresh interpreter; returns the CompletedProcess."""
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def one_line_error(result):
    """Assert a script failed the project's way (exit 2, one line ``error: ...``); return that line."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]
