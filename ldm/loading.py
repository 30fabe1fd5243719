"""One way to load any model, with its identity: the SHA-256 of everything that defines its weights.

    loaded = load_model("tiny-sd")                      # a folder under models/ (or a path)
    loaded = load_model(config_path=..., ckpt_path=...)  # a CompVis config + checkpoint
    loaded = load_model(diffusers_path=...)              # a diffusers StableDiffusionPipeline folder
    loaded = load_model("<run_name>")                    # an erasure run folder over its base model

Every script loads through ``load_model``; ``loaded.identity`` keys whatever is made with the model
(generated images, reports), so a result can never be reported for other weights than its own.
A run's edit is applied by its method's registry entry (``ldm.erasure.methods``). A run folder whose
base checkpoint is not byte-identical to the one it was trained on is refused (``force_base=True``
loads it anyway, with a warning).
"""
from dataclasses import dataclass
from pathlib import Path

from ldm.erasure.methods import method_of_run
from ldm.identity import compvis_identity, make_identity
from ldm.paths import model_roots, resolve_path
from ldm.runs import check_base, check_complete, check_not_interrupted, read_run_config, run_files
from ldm.util import UsageError, load_config, load_model_from_config, warn

CHECKPOINT_NAMES = ("model.ckpt", "model.safetensors")


@dataclass
class LoadedModel:
    """A loaded model: a CompVis ``LatentDiffusion`` (``kind`` compvis or run) or a diffusers pipeline
    (``kind`` diffusers), its name, its folder (if any), its identity and, for a run, its method."""
    model: object
    kind: str
    name: str
    identity: dict
    folder: Path = None
    config: object = None  # the CompVis config the model was built from (None for diffusers)
    method: object = None  # a run's ``ldm.erasure.methods.Method``

    @property
    def sha256(self):
        """One digest for the whole identity (files and base)."""
        return self.identity["sha256"]


def model_folder(model_name):
    """The folder of model ``model_name`` (the runs' folder, then the shipped models, or a path): an existing
    folder, or a UsageError listing the models here."""
    if Path(model_name).is_dir():
        return Path(model_name)
    for root in model_roots():
        if (root / str(model_name)).is_dir():
            return root / str(model_name)
        check_not_interrupted(root / str(model_name))
    known = sorted({p.name for root in model_roots() if root.is_dir() for p in root.iterdir() if not p.name.startswith(".")
                    and ((p / "config.yaml").is_file() or (p / "model_index.json").is_file())})
    raise UsageError(f"model '{model_name}' not found in {', '.join(map(str, model_roots()))}; models here: "
                     f"{', '.join(known)}")


def folder_kind(folder):
    """What a model folder holds: ``run``, ``diffusers`` or ``compvis``; anything else is one line."""
    if read_run_config(folder) is not None:
        return "run"
    if (Path(folder) / "model_index.json").is_file():
        return "diffusers"
    if (Path(folder) / "config.yaml").is_file() and any((Path(folder) / n).is_file() for n in CHECKPOINT_NAMES):
        return "compvis"
    raise UsageError(f"model folder '{folder}' needs config.yaml and model.ckpt (or model.safetensors), "
                     "model_index.json (diffusers), or, for an erasure run, its trained parameters")


def load_compvis(config_path, ckpt_path, device="cpu", unsafe_pickle=False, name=None):
    """A CompVis config + checkpoint."""
    config_path, ckpt_path = resolve_path(config_path), resolve_path(ckpt_path)
    if not Path(ckpt_path).is_file():
        raise UsageError(f"checkpoint '{ckpt_path}' not found")
    config = load_config(config_path)
    model = load_model_from_config(config, ckpt_path, device=device, unsafe_pickle=unsafe_pickle)
    return LoadedModel(model, "compvis", name or Path(ckpt_path).stem, compvis_identity(config, ckpt_path),
                       config=config)


def load_diffusers(path, device="cpu", name=None):
    """A diffusers StableDiffusionPipeline folder (identity: every file in it)."""
    from diffusers import StableDiffusionPipeline  # diffusers is slow to import; only this path needs it
    path = Path(resolve_path(path))
    if not (path / "model_index.json").is_file():
        raise UsageError(f"'{path}' is not a diffusers pipeline folder (no model_index.json)")
    pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False).to(device)
    files = {str(p.relative_to(path)): p for p in sorted(path.rglob("*")) if p.is_file()}
    return LoadedModel(pipe, "diffusers", name or path.name, make_identity("diffusers", files), path)


def load_run(run_dir, device="cpu", unsafe_pickle=False, force_base=False):
    """The edited model of a run folder (its whole ``model.ckpt`` when saved, else the base with the
    run's edit applied by its method) as a ``LoadedModel`` whose identity holds the run's files and its base's."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    if config is None:
        raise UsageError(f"'{run_dir}/config.yaml' has no run: or base_model: section; it is not a run folder")
    method = method_of_run(config)
    check_complete(run_dir, config)
    if (run_dir / "model.ckpt").is_file():
        model = load_model_from_config(config, run_dir / "model.ckpt", device, unsafe_pickle)
        return LoadedModel(model, "run", run_dir.name, make_identity("run", run_files(run_dir)), run_dir, config,
                           method)
    ckpt = check_base(run_dir, config.base_model, force_base, warn)
    model = load_model_from_config(config, ckpt, "cpu", unsafe_pickle)
    method.apply(model, run_dir)
    identity = make_identity("run", run_files(run_dir), base=compvis_identity(config, ckpt))
    return LoadedModel(model.to(device).eval(), "run", run_dir.name, identity, run_dir, config, method)


def load_run_base(loaded, device="cpu", unsafe_pickle=False):
    """The model a loaded run edits (its recorded base, checked by SHA-256); any other model is its own base."""
    if loaded.kind != "run":
        return loaded
    base = loaded.config.base_model
    return load_compvis(base.config_path, check_base(loaded.folder, base), device, unsafe_pickle)


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
    kind = folder_kind(folder)
    if kind == "run":
        return load_run(folder, device, unsafe_pickle, force_base)
    if kind == "diffusers":
        return load_diffusers(folder, device)
    ckpt = next(folder / n for n in CHECKPOINT_NAMES if (folder / n).is_file())
    loaded = load_compvis(folder / "config.yaml", ckpt, device, unsafe_pickle, name=folder.name)
    loaded.folder = folder
    return loaded
