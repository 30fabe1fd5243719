"""One way to load any model, with its identity: the SHA-256 of every file that defines it.

    loaded = load_model("tiny-sd")                      # a folder under models/ (or a path)
    loaded = load_model(config_path=..., ckpt_path=...)  # a CompVis config + checkpoint
    loaded = load_model(diffusers_path=...)              # a diffusers StableDiffusionPipeline folder
    loaded = load_model("<run_name>")                    # an erasure run folder over its base model

Every script loads through ``load_model``; ``loaded.identity`` keys whatever is made with the model
(generated images, reports), so a result can never be reported for other weights than its own.
A run folder whose base checkpoint is not byte-identical to the one it was trained on is refused
(``force_base=True`` loads it anyway, with a warning).
"""
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ldm.paths import MODELS_DIR, resolve_path
from ldm.util import UsageError, file_sha256, json_sha256, load_config, load_model_from_config

CHECKPOINT_NAMES = ("model.ckpt", "model.safetensors")


@dataclass
class LoadedModel:
    """A loaded model: a CompVis ``LatentDiffusion`` (``kind`` compvis or run) or a diffusers pipeline
    (``kind`` diffusers), its name, its folder (if any) and its identity."""
    model: object
    kind: str
    name: str
    identity: dict
    folder: Path = None
    config: object = None  # the CompVis config the model was built from (None for diffusers)

    @property
    def sha256(self):
        """One digest for the whole identity (files and base)."""
        return self.identity["sha256"]


@lru_cache(maxsize=256)
def _cached_sha256(path, size, mtime_ns):
    return file_sha256(path)


def sha256_of(path):
    """SHA-256 of a file, computed once per process for a given path, size and modification time."""
    path = Path(path).resolve()
    stat = path.stat()
    return _cached_sha256(str(path), stat.st_size, stat.st_mtime_ns)


def make_identity(kind, files, base=None):
    """``{"kind", "files": {name: sha256}, "base", "sha256"}``; ``sha256`` digests the rest."""
    identity = {"kind": kind, "files": {name: sha256_of(path) for name, path in sorted(files.items())}}
    if base is not None:
        identity["base"] = base
    identity["sha256"] = json_sha256(identity)
    return identity


def model_folder(model_name):
    """``models/<name>`` (or a path): an existing folder, or a UsageError listing the models here."""
    folder = Path(model_name) if Path(model_name).is_dir() else MODELS_DIR / str(model_name)
    if not folder.is_dir():
        known = sorted(p.name for p in MODELS_DIR.iterdir()
                       if (p / "config.yaml").is_file() or (p / "model_index.json").is_file())
        raise UsageError(f"model '{model_name}' not found: no folder {folder}; models here: {', '.join(known)}")
    return folder


def compvis_identity(config_path, ckpt_path):
    """Identity of a CompVis config + checkpoint pair."""
    return make_identity("compvis", {"config": resolve_path(config_path), "checkpoint": resolve_path(ckpt_path)})


def load_compvis(config_path, ckpt_path, device="cpu", unsafe_pickle=False, name=None):
    """A CompVis config + checkpoint."""
    config_path, ckpt_path = resolve_path(config_path), resolve_path(ckpt_path)
    if not Path(ckpt_path).is_file():
        raise UsageError(f"checkpoint '{ckpt_path}' not found")
    config = load_config(config_path)
    model = load_model_from_config(config, ckpt_path, device=device, unsafe_pickle=unsafe_pickle)
    return LoadedModel(model, "compvis", name or Path(ckpt_path).stem, compvis_identity(config_path, ckpt_path),
                       config=config)


def load_diffusers(path, device="cpu", name=None):
    """A diffusers StableDiffusionPipeline folder (identity: every file in it)."""
    from diffusers import StableDiffusionPipeline
    path = Path(resolve_path(path))
    if not (path / "model_index.json").is_file():
        raise UsageError(f"'{path}' is not a diffusers pipeline folder (no model_index.json)")
    pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False).to(device)
    files = {str(p.relative_to(path)): p for p in sorted(path.rglob("*")) if p.is_file()}
    return LoadedModel(pipe, "diffusers", name or path.name, make_identity("diffusers", files), path)


def load_model(model_name=None, config_path=None, ckpt_path=None, diffusers_path=None, device="cpu",
               unsafe_pickle=False, force_base=False):
    """Load the model the arguments name (see the module docstring); returns a ``LoadedModel``."""
    if diffusers_path:
        return load_diffusers(diffusers_path, device, name=model_name)
    if ckpt_path or config_path:
        if not (ckpt_path and config_path):
            raise UsageError("--ckpt_path and --config_path go together")
        return load_compvis(config_path, ckpt_path, device, unsafe_pickle, name=model_name)
    folder = model_folder(model_name or "tiny-sd")
    from ldm.erasure.runs import is_run_dir, load_run
    if is_run_dir(folder):
        return load_run(folder, device, unsafe_pickle, force_base)
    if (folder / "model_index.json").is_file():
        return load_diffusers(folder, device)
    ckpt = next((folder / n for n in CHECKPOINT_NAMES if (folder / n).is_file()), None)
    if not (folder / "config.yaml").is_file() or ckpt is None:
        raise UsageError(f"model folder '{folder}' needs config.yaml and model.ckpt (or model.safetensors), "
                         "model_index.json (diffusers), or, for an erasure run, its trained parameters")
    loaded = load_compvis(folder / "config.yaml", ckpt, device, unsafe_pickle, name=folder.name)
    loaded.folder = folder
    return loaded


def warn(message):
    """A one-line warning on stderr."""
    print(f"warning: {message}", file=sys.stderr)
