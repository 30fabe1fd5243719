"""A model's identity: the SHA-256 of everything that defines its weights, the key of every cached image,
report and figure made with it, so a result is never reported for other weights than its own.

A CompVis model is its checkpoint's bytes and its config's ``model:`` section (not the whole file: a
method's defaults beside ``model:`` change no weight). A run adds its own files (``ldm.runs.run_files``).
"""
from functools import lru_cache
from pathlib import Path

from omegaconf import OmegaConf

from ldm.paths import resolve_path
from ldm.util import file_sha256, json_sha256, load_config


@lru_cache(maxsize=256)
def _cached_sha256(path, size, mtime_ns):
    return file_sha256(path)


def sha256_of(path):
    """SHA-256 of a file, computed once per process for a given path, size and modification time."""
    path = Path(path).resolve()
    stat = path.stat()
    return _cached_sha256(str(path), stat.st_size, stat.st_mtime_ns)


def model_section_sha256(config):
    """SHA-256 of a config's ``model:`` section (a path or a loaded config), resolved, keys sorted."""
    config = config if OmegaConf.is_config(config) else load_config(config)
    return json_sha256(OmegaConf.to_container(config.model, resolve=True))


def make_identity(kind, files, base=None, model_config=None):
    """``{"kind", "files": {name: sha256}, "model_config", "base", "sha256"}``; ``sha256`` digests the rest."""
    identity = {"kind": kind, "files": {name: sha256_of(path) for name, path in sorted(files.items())}}
    if model_config is not None:
        identity["model_config"] = model_section_sha256(model_config)
    if base is not None:
        identity["base"] = base
    identity["sha256"] = json_sha256(identity)
    return identity


def compvis_identity(config, ckpt_path):
    """Identity of a CompVis checkpoint and its config's ``model:`` section (``config``: a path or a loaded config)."""
    config = config if OmegaConf.is_config(config) else resolve_path(config)
    return make_identity("compvis", {"checkpoint": resolve_path(ckpt_path)}, model_config=config)
