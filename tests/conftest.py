"""Shared fixtures: a reduced-width model with SD v1's exact structure, filled with random weights; the
session's isolation (runs, caches and default outputs in a temporary folder, never in the repository); and
``call_script``, which runs a project script's ``main(argv)`` in this process as the shell would run it."""
import contextlib
import copy
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.paths import REPO_ROOT, TINY_SD_DIR
from ldm.util import instantiate_from_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Isolation for the whole session, set at import so that every script run in this process and every child
# process inherits it: runs go to LDM_MODELS_DIR, caches (concept-data/) to LDM_OUTPUTS_DIR, and the working
# directory (where relative default --save_path values land) is a temporary folder too. Nothing a test does
# writes into the repository.
SESSION_DIR = Path(tempfile.mkdtemp(prefix="ldm-tests-"))
for _name, _folder in (("LDM_MODELS_DIR", "models"), ("LDM_OUTPUTS_DIR", "outputs")):
    os.environ[_name] = str(SESSION_DIR / _folder)
    (SESSION_DIR / _folder).mkdir()
SESSION_CWD = SESSION_DIR / "cwd"
SESSION_CWD.mkdir()

SD_CONFIG = REPO_ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"
SHARED = REPO_ROOT.parent / "shared"  # optional reference data beside the checkout; its tests skip without it

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


@pytest.fixture(scope="session", autouse=True)
def session_isolation():
    """Every test runs from a temporary working directory, with the runs' and outputs' folders temporary
    (``LDM_MODELS_DIR``, ``LDM_OUTPUTS_DIR``, set at import), all removed when pytest ends; a file that appeared
    under the repository's models/ or outputs/ meanwhile fails the session."""
    assert Path(os.environ["LDM_MODELS_DIR"]) == SESSION_DIR / "models", "a test replaced LDM_MODELS_DIR"
    before, repo_files = os.getcwd(), _repository_outputs()
    os.chdir(SESSION_CWD)
    yield SESSION_DIR
    os.chdir(before)
    written = sorted(set(_repository_outputs()) - set(repo_files))
    assert not written, f"tests wrote into the repository: {', '.join(written[:5])}"


def pytest_unconfigure(config):
    shutil.rmtree(SESSION_DIR, ignore_errors=True)


def _repository_outputs():
    """Every file and folder under the repository's models/ and outputs/ (where a leaky test would write)."""
    return [str(p.relative_to(REPO_ROOT)) for root in (REPO_ROOT / "models", REPO_ROOT / "outputs") if root.is_dir()
            for p in root.rglob("*")]


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


TINY = TINY_SD_DIR


@pytest.fixture(scope="session")
def _tiny_loaded():
    """tiny-sd as shipped, loaded once per session; tests get copies (``tiny``) or copies of its weights."""
    from ldm.util import load_model_from_config
    return load_model_from_config(TINY / "config.yaml", TINY / "model.ckpt").eval()


@pytest.fixture
def tiny_state(_tiny_loaded):
    """tiny-sd's weights (a copy each test may change)."""
    return {k: v.clone() for k, v in _tiny_loaded.state_dict().items()}


@pytest.fixture
def tiny(_tiny_loaded):
    """A fresh tiny-sd model (a deep copy of the session's loaded one: its own weights, hooks and flags)."""
    return copy.deepcopy(_tiny_loaded).eval()


def run_script(script, *args, cwd=None):
    """Run a project script in a fresh interpreter (from the session's temporary working directory, with
    its isolated folders); returns the CompletedProcess. For end-to-end checks only: ``call_script`` runs
    the same ``main(argv)`` without paying for a new interpreter's imports."""
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *map(str, args)], cwd=cwd or SESSION_CWD,
                          capture_output=True, text=True, timeout=600)


_SCRIPTS = {}


def load_script(script):
    """A project script (path relative to the repository) imported as a module, once per session, under a
    module name of its own (``script_train_scripts_train_esd``)."""
    path = REPO_ROOT / script
    if path not in _SCRIPTS:
        name = "script_" + re.sub(r"\W", "_", str(Path(script).with_suffix("")))
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _SCRIPTS[path] = module
    return _SCRIPTS[path]


@dataclass
class ScriptResult:
    """What ``call_script`` saw: the exit status the shell would see, and the script's stdout and stderr."""
    returncode: int
    stdout: str
    stderr: str


def call_script(script, *args, **kwargs):
    """Run ``script``'s ``main`` through ``ldm.cli.run`` with ``args`` (as strings) in this process, as the
    shell runs it: a UsageError or an argparse error is ``error: ...`` on stderr and exit status 2. Anything
    else a script raises propagates, with its traceback, and fails the test."""
    from ldm.cli import run
    main = load_script(script).main
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run(main, [str(a) for a in args], **kwargs)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return ScriptResult(code, out.getvalue(), err.getvalue())


def one_line_error(result):
    """Assert a script failed the project's way (exit 2, one line ``error: ...``); return that line."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture
def run_name(tmp_path):
    """A run name no other test uses: runs share the session's models folder (``LDM_MODELS_DIR``)."""
    return f"run-{tmp_path.name}"


@pytest.fixture
def new_tiny(_tiny_loaded):
    """A factory of fresh tiny-sd models (deep copies of the session's loaded one), for tests needing several."""
    return lambda: copy.deepcopy(_tiny_loaded).eval()
