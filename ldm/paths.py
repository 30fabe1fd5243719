"""Where the project keeps its files, so that relative paths in configs work from any directory.

Shipped models (tiny-sd, the CLIP tokenizer) live in the repository's ``models/``. Runs are written to
``models_dir()``: the same folder unless ``LDM_MODELS_DIR`` names another (the tests point it at a
temporary folder); caches and default outputs go to ``outputs_dir()`` (``LDM_OUTPUTS_DIR``).
"""
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MODELS_DIR = REPO_ROOT / "models"
CLIP_TOKENIZER_DIR = SHIPPED_MODELS_DIR / "clip-tokenizer"
TINY_SD_DIR = SHIPPED_MODELS_DIR / "tiny-sd"
EVALUATOR_PATH = TINY_SD_DIR / "evaluator.safetensors"


def models_dir():
    """The folder runs are written to and looked up in first (``LDM_MODELS_DIR``, else ``models/``)."""
    return Path(os.environ.get("LDM_MODELS_DIR") or SHIPPED_MODELS_DIR)


def outputs_dir():
    """The folder of caches and default outputs (``LDM_OUTPUTS_DIR``, else ``outputs/``)."""
    return Path(os.environ.get("LDM_OUTPUTS_DIR") or REPO_ROOT / "outputs")


def model_roots():
    """Where a model named by its folder name is looked for: the runs' folder, then the shipped models."""
    return list(dict.fromkeys([models_dir(), SHIPPED_MODELS_DIR]))


def resolve_path(path):
    """Return ``path`` as given if it exists, else relative to the repository root (configs use this)."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path
