"""Config instantiation and safe checkpoint loading, the one way every script builds a model."""
import fnmatch
import hashlib
import importlib
import math
import os
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import OmegaConf


class UsageError(Exception):
    """A problem the user can fix (bad file, flag or config); scripts print it as one line."""


def warn(message):
    """A one-line warning on stderr."""
    print(f"warning: {message}", file=sys.stderr)


def get_obj_from_str(string):
    """Import ``package.module.Name`` and return ``Name``."""
    module, cls = string.rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)


# A config is downloaded like a checkpoint, so by default its ``target:`` may name only the project's model
# classes (torch modules and the LR schedule defined under ``ldm.``) and the few others SD v1 configs use.
OTHER_CONFIG_TARGETS = ("torch.nn.Identity",)
UNSAFE_CONFIG_ENV = "LDM_UNSAFE_CONFIG"


def check_config_target(name):
    """The class a config's ``target:`` names, refused in one line unless it is one of the project's model
    classes (``LDM_UNSAFE_CONFIG=1``: any callable, for a config you trust)."""
    if os.environ.get(UNSAFE_CONFIG_ENV) == "1" or name in OTHER_CONFIG_TARGETS:
        return get_obj_from_str(name)
    refused = (f"config target '{name}' is not one of this project's model classes: loading it would run code the "
               f"config names; set {UNSAFE_CONFIG_ENV}=1 only for a config you trust")
    if not str(name).startswith("ldm."):
        raise UsageError(refused)
    target = get_obj_from_str(name)
    schedule = getattr(target, "__module__", "") == "ldm.lr_scheduler"
    if not (isinstance(target, type) and (issubclass(target, torch.nn.Module) or schedule)):
        raise UsageError(refused)
    return target


def instantiate_from_config(config):
    """Build ``config.target(**config.params)``, the CompVis convention (``__is_first_stage__`` and
    ``__is_unconditional__`` are the placeholders CompVis handles elsewhere and give None). The target is
    checked first (``check_config_target``)."""
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise UsageError(f"config entry has no 'target:' key: {OmegaConf.to_yaml(config) if OmegaConf.is_config(config) else config}")
    try:
        target = check_config_target(config["target"])
    except (ImportError, AttributeError, ValueError) as error:
        raise UsageError(f"config target '{config['target']}' cannot be imported ({error}); "
                         "check the target: line of the config") from None
    params = config.get("params", dict()) or dict()
    return target(**params)


def count_params(model):
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def load_config(path):
    """Load a YAML config; a missing or malformed file is a UsageError."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file '{path}' not found")
    try:
        config = OmegaConf.load(path)
    except Exception as error:  # omegaconf raises yaml's many error types
        raise UsageError(f"config file '{path}' is not valid YAML: {error}") from None
    if "model" not in config:
        raise UsageError(f"config file '{path}' has no 'model:' section; expected a CompVis model config")
    return config


def _stub_class(qualified_name):
    """A stand-in for a pickled class that must not be imported: records constructor args and state."""
    module, _, name = qualified_name.rpartition(".")

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    return type(name, (), {"__module__": module, "__init__": __init__, "__setstate__": __setstate__,
                           "__reduce_placeholder__": qualified_name})


def load_checkpoint_file(path, unsafe_pickle=False):
    """Read a ``.safetensors`` file or a CompVis/Lightning ``.ckpt`` and return its raw contents.

    ``.ckpt`` files load with ``torch.load(weights_only=True)``. Lightning checkpoints also pickle
    classes (callbacks, numpy scalars) that this refuses; those are replaced by inert stand-ins, so no
    code from the file runs. ``unsafe_pickle=True`` allows full unpickling, for files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint '{path}' not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as error:
            raise UsageError(f"'{path}' is not a valid safetensors file ({error})") from None
    if unsafe_pickle:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:
            raise UsageError(f"'{path}' could not be read as a PyTorch checkpoint ({error})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first_error:
        if not zipfile.is_zipfile(path):
            raise UsageError(f"'{path}' is not a PyTorch checkpoint or a safetensors file "
                             f"({str(first_error).splitlines()[0]})") from None
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        stubs = [(_stub_class(name), name) for name in unsafe]
        with torch.serialization.safe_globals(stubs):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UsageError(f"'{path}' could not be loaded safely ({str(error).splitlines()[0]}); if you trust the "
                         "file, pass --unsafe_pickle to unpickle it fully") from None


def state_dict_from_checkpoint(checkpoint):
    """The model state dict inside a loaded checkpoint (Lightning ``state_dict`` or a flat dict)."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise UsageError("the file holds no state dict of tensors; expected a CompVis checkpoint")
    return checkpoint


# Keys a CompVis checkpoint may hold that the model has no use for at inference or fine-tuning:
# the EMA copy (its config says use_ema: False), the autoencoder's training losses, and buffers that
# newer library versions no longer persist.
IGNORED_CHECKPOINT_KEYS = (
    "model_ema.*",
    "cond_stage_model_ema.*",
    "first_stage_model.loss.*",
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
    "lvlb_weights",
)


def _is_ignored(key, ignored):
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in ignored)


def load_state_dict_strict(model, state_dict, ignored=IGNORED_CHECKPOINT_KEYS, source="checkpoint"):
    """Load ``state_dict`` into ``model``; any missing, unexpected or mis-shaped key is a UsageError.

    Checkpoint keys matching ``ignored`` (shell-style patterns) that the model lacks are skipped on
    purpose, and so are such model keys the checkpoint lacks; nothing else is, so a checkpoint that does
    not fit its config can never silently leave initial weights in place.
    """
    own = model.state_dict()
    # an ignored key is skipped only where the model has no such key (an EMA model loads model_ema.*)
    state_dict = {k: v for k, v in state_dict.items() if k in own or not _is_ignored(k, ignored)}
    missing = [k for k in own if k not in state_dict and not _is_ignored(k, ignored)]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k}: {tuple(state_dict[k].shape)} in {source}, {tuple(own[k].shape)} in model"
                  for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches (first: {'; '.join(mismatched[:3])})")
    if missing:
        problems.append(f"{len(missing)} keys missing (first: {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3])})")
    if problems:
        raise UsageError(f"{source} does not match the config: {'; '.join(problems)}. "
                         "Use the config the checkpoint was trained with")
    model.load_state_dict(state_dict, strict=False)  # strictness was checked above, ignored keys aside
    return model


def load_model_from_config(config, ckpt=None, device="cpu", unsafe_pickle=False):
    """Instantiate ``config.model`` and load ``ckpt`` into it strictly; return the model in eval mode.

    ``config`` is a path or a loaded OmegaConf config; ``ckpt`` a ``.ckpt``/``.safetensors`` file or None.
    """
    if not OmegaConf.is_config(config):
        config = load_config(config)
    model = instantiate_from_config(config.model)
    if ckpt is not None:
        state_dict = state_dict_from_checkpoint(load_checkpoint_file(ckpt, unsafe_pickle=unsafe_pickle))
        load_state_dict_strict(model, state_dict, source=f"checkpoint '{ckpt}'")
    return model.to(device).eval()


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; on success it is renamed to ``path`` (readers never see
    half a file, and a killed writer leaves the old file intact), on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_to_csv(table, path):
    """Write a DataFrame to ``path`` as CSV (no index) atomically."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return Path(path)


def atomic_save(obj, path):
    """``torch.save`` ``obj`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def atomic_save_safetensors(tensors, path, metadata=None):
    """Write ``tensors`` as safetensors to ``path`` atomically (contiguous copies; ``metadata`` values as strings)."""
    from safetensors.torch import save_file
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={k: str(v) for k, v in (metadata or {}).items()})
    return Path(path)


def atomic_write_text(path, text):
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def file_sha256(path, chunk=1 << 20):
    """SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def json_sha256(obj):
    """SHA-256 hex digest of a JSON-able object (keys sorted), to key things by settings or identities."""
    import json
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def tensors_sha256(state_dict):
    """SHA-256 hex digest of a state dict's names, dtypes, shapes and values (independent of key order)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        value = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def dict_differences(old, new, prefix=""):
    """Dotted names of the entries in which two nested dicts differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            yield from dict_differences(old.get(key), new.get(key), f"{prefix}{key}.")
    elif old != new:
        yield prefix.rstrip(".") or "value"


def check_positive(settings, *names):
    """Each of ``names`` (attributes of ``settings``: parsed flags or a settings dataclass) must be a finite
    number > 0; one line naming the flag otherwise."""
    for name in names:
        value = getattr(settings, name)
        if not (value > 0 and math.isfinite(value)):
            raise UsageError(f"--{name} must be a positive number, got {value}")


def check_at_least(settings, minimum, *names):
    """Each of ``names`` given (not None) must be >= ``minimum``; one line naming the flag otherwise."""
    for name in names:
        if getattr(settings, name) is not None and getattr(settings, name) < minimum:
            raise UsageError(f"--{name} must be >= {minimum}, got {getattr(settings, name)}")
