"""The run-folder format: ``<models_dir>/<run_name>/``, an erasure method's edit over a named base model.

    config.yaml                 the base model's CompVis config (model:) plus run: (every setting, ``method``
                                among them) and base_model: (config, checkpoint, their SHA-256)
    trained-params.safetensors  overlay edits (ESD, CiE): the trained parameters alone, CompVis keys
    term-<concept>.safetensors  separable edits (SepCE, CPE): one file per erased concept
    model.ckpt                  optional (--save_compvis): the whole edited CompVis checkpoint
    checkpoints/last.pt         the resumable training state (tensors and plain values only)

This module reads and writes those files and knows nothing of any method: how an edit is applied is
the method registry's business (``ldm.erasure.methods``), loading a run ``ldm.loading``'s.
"""
import re
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file

from ldm.identity import sha256_of
from ldm.paths import models_dir, resolve_path
from ldm.util import (UsageError, atomic_path, atomic_save, atomic_save_safetensors, dict_differences, load_config)

TRAINED_PARAMS = "trained-params.safetensors"
TERM_PREFIX = "term-"
RESUME_STATE = Path("checkpoints") / "last.pt"
RUN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
# settings that may differ between a killed run and its --resume (they change no weight)
NOT_SETTINGS = ("resume", "overwrite", "save_every", "devices", "no_diffusers", "no_samples", "save_compvis",
                "mixed_precision", "gradient_checkpointing", "show_settings", "resume_command")


def check_run_name(name):
    """A run name is one folder name (letters, digits, ``.``, ``_``, ``-``; not ``.`` or ``..``), so a run is
    always written inside the models folder; anything else is one line."""
    name = str(name)
    if not RUN_NAME.match(name) or name in (".", ".."):
        raise UsageError(f"run name '{name}': use one folder name of letters, digits, '.', '_' and '-' (runs are "
                         f"written under {models_dir()}; set LDM_MODELS_DIR to write them elsewhere)")
    return name


def run_folder(name, root=None):
    """The folder of run ``name`` under ``root`` (default: the models folder), the name checked first."""
    return (root or models_dir()) / check_run_name(name)


def read_run_config(folder):
    """A run folder's ``config.yaml`` when it is a run (a ``run:`` and a ``base_model:`` section), else None."""
    config_path = Path(folder) / "config.yaml"
    if not config_path.is_file():
        return None
    config = load_config(config_path)
    if config.get("base_model") is None or config.get("run") is None:
        return None
    return config


def is_run_dir(folder):
    """Whether ``folder`` is a run folder (an edit over a named base model)."""
    return read_run_config(folder) is not None


def partial_folder(final):
    """Where run ``final`` is built: ``.<name>.partial`` beside it, renamed into place when complete."""
    return final.parent / f".{final.name}.partial"


def prepare_run_dir(name, resume=False, overwrite=False, check_only=False, root=None):
    """The folder to build run ``name`` in: ``.<name>.partial`` beside its final place (``finish_run_dir``
    renames it there), fresh, or with ``resume`` the one a killed erase left. An existing run is replaced only
    with ``overwrite``, only if it is a run of this project, and only once the new one is complete.

    ``check_only`` checks without touching anything: scripts call it before loading the model and
    again, for real, once every argument has been checked, so a bad flag never costs an old run.
    """
    final = run_folder(name, root)
    partial = partial_folder(final)
    if resume:
        if (partial / RESUME_STATE).is_file():
            return partial
        raise UsageError(f"nothing to resume: no interrupted erase of run '{name}' ({partial / RESUME_STATE} does not "
                         "exist); drop --resume")
    if partial.exists() and not overwrite:
        raise UsageError(f"an erase of run '{name}' was interrupted or is running ({partial}); pass --resume to "
                         "finish it, --overwrite to start anew, or choose another --run_name")
    if final.exists() and any(final.iterdir()):
        if not overwrite:
            raise UsageError(f"run folder '{final}' already exists; pass --overwrite to replace it, or choose another "
                             "--run_name")
        if not is_run_dir(final):
            raise UsageError(f"'{final}' is not a run folder of this project; --overwrite replaces only runs: "
                             "move it away or choose another --run_name")
    if not check_only:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    return partial


def finish_run_dir(partial):
    """Rename a complete run from ``partial`` into its final place, replacing an old run of that name only now:
    a kill at any point leaves the old run or the new one whole. Returns the final folder."""
    final = partial.parent / partial.name[1:-len(".partial")]
    replaced = partial.parent / f".{final.name}.replaced"
    if final.exists():
        shutil.rmtree(replaced, ignore_errors=True)
        final.rename(replaced)
    partial.rename(final)
    shutil.rmtree(replaced, ignore_errors=True)
    return final


def check_not_interrupted(folder):
    """A run name whose erase was killed (only its partial folder exists) is one line naming the command that
    resumes it."""
    partial = partial_folder(Path(folder))
    config = read_run_config(partial) if partial.is_dir() else None
    if config is not None:
        command = config.run.get("resume_command") or "its erase command with --resume"
        raise UsageError(f"run '{Path(folder).name}' is incomplete: its erase did not finish; resume it with: {command}")


def base_identity(config_path, ckpt_path):
    """What names the base model a run edits: paths, size and SHA-256 of its config and checkpoint."""
    config, ckpt = Path(resolve_path(config_path)).resolve(), Path(resolve_path(ckpt_path)).resolve()
    return {"config_path": str(config), "ckpt_path": str(ckpt), "ckpt_bytes": ckpt.stat().st_size,
            "ckpt_sha256": sha256_of(ckpt), "config_sha256": sha256_of(config)}


def write_run_config(run_dir, model_config, run_args, base):
    """``config.yaml``: the base model's config with ``run:`` and ``base_model:`` sections added."""
    config = OmegaConf.merge(model_config, {"run": run_args, "base_model": base})
    with atomic_path(Path(run_dir) / "config.yaml") as tmp:
        OmegaConf.save(config, tmp)


def save_trained_params(run_dir, state_dict, metadata):
    """Write the trained parameters (CompVis keys) as safetensors, atomically."""
    atomic_save_safetensors(state_dict, Path(run_dir) / TRAINED_PARAMS, metadata)


def apply_trained_params(model, run_dir):
    """Copy a run's trained parameters into ``model``; every key must exist with the same shape."""
    path = Path(run_dir) / TRAINED_PARAMS
    params = load_file(str(path))
    state = model.state_dict()
    missing = [k for k in params if k not in state]
    if missing:
        raise UsageError(f"'{path}' holds parameters this model lacks ({', '.join(missing[:3])}...); "
                         "it was trained on another base model")
    wrong = [k for k, v in params.items() if state[k].shape != v.shape]
    if wrong:
        raise UsageError(f"'{path}' has parameters of other shapes ({', '.join(wrong[:3])}); "
                         "it was trained on another base model")
    with torch.no_grad():
        for key, value in params.items():
            state[key].copy_(value)
    return model


def term_file_name(concept):
    """The file of one concept's term: ``term-<concept, lowercase, non-alphanumerics as ->.safetensors``."""
    slug = re.sub(r"[^a-z0-9]+", "-", concept.lower()).strip("-") or "concept"
    return f"{TERM_PREFIX}{slug}.safetensors"


def term_files(run_dir):
    """A run's term files, in name order."""
    return sorted(Path(run_dir).glob(f"{TERM_PREFIX}*.safetensors"))


def _term_metadata(path):
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    if "concept" not in metadata:
        raise UsageError(f"'{path}' is not a separable term (no concept in its metadata)")
    return metadata


def term_concepts(run_dir):
    """``{concept: term file}`` of a run, read from the files' metadata alone (no tensors loaded)."""
    return {_term_metadata(path)["concept"]: path for path in term_files(run_dir)}


def read_term(path):
    """One term file: ``(tensors, metadata)``; the metadata names at least ``concept``."""
    metadata = _term_metadata(path)
    return load_file(str(path)), metadata


def save_term(run_dir, concept, tensors, metadata):
    """Write one concept's term atomically; returns its path."""
    return atomic_save_safetensors(tensors, Path(run_dir) / term_file_name(concept), {**metadata, "concept": concept})


def check_complete(run_dir, config):
    """A run whose erase did not finish (no edit written yet) is one line naming the command that resumes it;
    a restore that dropped every term is complete (it is the base model)."""
    run_dir = Path(run_dir)
    if (run_dir / TRAINED_PARAMS).is_file() or term_files(run_dir) or (run_dir / "model.ckpt").is_file():
        return
    if config.run.get("restored") is not None:
        return
    command = config.run.get("resume_command") or "its erase command with --resume"
    raise UsageError(f"run '{run_dir.name}' is incomplete: its erase did not finish; resume it with: {command}")


def run_files(run_dir):
    """The files that define a run's edit: its config, trained parameters or terms, and model.ckpt (an
    exported single file beside them is an output, not part of the edit)."""
    run_dir = Path(run_dir)
    files = {"config.yaml": run_dir / "config.yaml"}
    for path in [run_dir / TRAINED_PARAMS, *term_files(run_dir), run_dir / "model.ckpt"]:
        if path.is_file():
            files[path.name] = path
    return files


def find_run(name, flag, accepts=None, wanted="a run"):
    """The folder of run ``name`` for ``flag``; one line when there is none, or when ``accepts(config)``
    (a run's config) says it is not the kind of run ``flag`` needs (``wanted`` names that kind)."""
    folder = models_dir() / str(name) if RUN_NAME.match(str(name)) else Path(name)
    config = read_run_config(folder) if folder.is_dir() else None
    if config is None:
        check_not_interrupted(folder)
        runs = sorted(p.name for p in models_dir().iterdir() if p.is_dir() and not p.name.startswith(".") and is_run_dir(p))
        raise UsageError(f"{flag} '{name}': no such run (no run folder {folder}); runs here: {', '.join(runs) or 'none'}")
    if accepts is not None and not accepts(config):
        raise UsageError(f"{flag} '{name}' is a {config.run.get('method')} run; it needs {wanted}")
    return folder


def restore_concept(run_dir, concept, new_name, overwrite=False, root=None):
    """Write run ``new_name``: ``run_dir`` with ``concept``'s term dropped (every other term and the config
    kept; ``run.restored`` lists what was dropped). Dropping every term gives the base model."""
    run_dir = Path(run_dir)
    if run_folder(new_name, root).resolve() == run_dir.resolve():
        raise UsageError("--run_name must differ from --model_name: a restore writes a new run")
    terms = term_concepts(run_dir)
    if concept not in terms:
        raise UsageError(f"--concept '{concept}' is not erased by run '{run_dir.name}'; its concepts: "
                         f"{', '.join(repr(c) for c in terms)}")
    new_dir = prepare_run_dir(new_name, overwrite=overwrite, root=root)
    config = load_config(run_dir / "config.yaml")
    restored = list(config.run.get("restored", [])) + [concept]
    config = OmegaConf.merge(config, {"run": {"restored": restored, "restored_from": run_dir.name,
                                              "concepts": [c for c in terms if c != concept]}})
    with atomic_path(new_dir / "config.yaml") as tmp:
        OmegaConf.save(config, tmp)
    for name, path in terms.items():
        if name != concept:
            shutil.copyfile(path, new_dir / path.name)
    return finish_run_dir(new_dir)


def check_base(run_dir, base, force_base=False, warn=None):
    """The base checkpoint a run names, refused unless its SHA-256 is the one the run was trained on
    (``force_base``: loaded anyway, ``warn`` told why)."""
    run_dir = Path(run_dir)
    ckpt = Path(base.ckpt_path)
    if not ckpt.is_file():
        raise UsageError(f"the base checkpoint of run '{run_dir.name}' is missing: {ckpt}; put it back or "
                         "edit base_model.ckpt_path in its config.yaml")
    expected, actual = base.get("ckpt_sha256"), sha256_of(ckpt)
    if actual != expected:
        message = (f"the base checkpoint {ckpt} is not the one run '{run_dir.name}' was trained on "
                   f"(sha256 {actual[:12]}... != {str(expected)[:12]}...)")
        if not force_base:
            raise UsageError(f"{message}; retrain the run on this base, or pass --force_base to load it anyway")
        warn(f"{message}; loading it anyway (--force_base): results are not those of the trained run")
    return ckpt


def check_resume(run_dir, run_args, base):
    """Refuse to resume a run with other settings or on another base checkpoint than it started with."""
    recorded = load_config(Path(run_dir) / "config.yaml")
    old = {k: v for k, v in OmegaConf.to_container(recorded.get("run", {})).items() if k not in NOT_SETTINGS}
    new = OmegaConf.to_container(OmegaConf.create({k: v for k, v in run_args.items() if k not in NOT_SETTINGS}))
    differ = sorted(dict_differences(old, new))
    if recorded.get("base_model", {}).get("ckpt_sha256") != base["ckpt_sha256"]:
        differ.append("base checkpoint (sha256)")
    if differ:
        raise UsageError(f"run '{Path(run_dir).name}' was started with other settings ({', '.join(differ[:4])}); "
                         "resume with the same ones, or drop --resume (with --overwrite) to start anew")


def save_resume_state(run_dir, state):
    """Write the resumable state atomically (the previous one stays until the new one is complete)."""
    return atomic_save(state, Path(run_dir) / RESUME_STATE)


def load_resume_state(run_dir):
    """The resumable state, loaded safely (tensors and plain values only); anything else is one line."""
    path = Path(run_dir) / RESUME_STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle's and torch's many error types for a file that is not ours
        raise UsageError(f"'{path}' is not a resumable state this project wrote ({type(error).__name__}); "
                         "drop --resume and pass --overwrite to start the run anew") from None
