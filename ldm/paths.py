"""Where the project keeps its files, so that relative paths in configs work from any directory."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "models"
CLIP_TOKENIZER_DIR = MODELS_DIR / "clip-tokenizer"


def resolve_path(path):
    """Return ``path`` as given if it exists, else relative to the repository root (configs use this)."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path
