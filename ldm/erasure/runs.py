"""Run folders of erasure methods: ``models/<run_name>/`` with the edit, its config and the base
model's identity, loadable by name wherever a model is named; and what every train script does
around its method's trainer (``add_run_args``, ``start_run``, ``finish_run``).

    models/<run_name>/
      config.yaml                 the base model's CompVis config (model:) plus run: (every argument,
                                  ``method`` among them) and base_model: (config, checkpoint, sha256)
      trained-params.safetensors  ESD, CiE: the trained parameters alone, CompVis keys, over the base
      term-<concept>.safetensors  SepCE: one separable term per erased concept, summed over the base
      model.ckpt                  optional (--save_compvis): the whole edited CompVis checkpoint
      checkpoints/last.pt         periodic resumable state (trained weights, optimizer, RNG)

The edit is applied by the method the run records (``EDITS``); nothing else loads runs.
"""
import contextlib
import re
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ldm.loading import LoadedModel, make_identity, sha256_of, warn
from ldm.paths import MODELS_DIR, resolve_path
from ldm.util import (UsageError, atomic_path, atomic_save, atomic_save_safetensors, atomic_write_text,
                      dict_differences, load_config, load_model_from_config)

TRAINED_PARAMS = "trained-params.safetensors"
TERM_PREFIX = "term-"
RESUME_STATE = Path("checkpoints") / "last.pt"


def base_identity(config_path, ckpt_path):
    """What names the base model a run edits: paths, size and SHA-256 of its config and checkpoint."""
    config, ckpt = Path(resolve_path(config_path)).resolve(), Path(resolve_path(ckpt_path)).resolve()
    return {"config_path": str(config), "ckpt_path": str(ckpt), "ckpt_bytes": ckpt.stat().st_size,
            "ckpt_sha256": sha256_of(ckpt), "config_sha256": sha256_of(config)}


def prepare_run_dir(name, resume=False, overwrite=False, root=MODELS_DIR, check_only=False):
    """``root/name``, new or (with ``resume``) holding a resumable state; never silently reused.

    ``check_only`` checks without touching anything: scripts call it before loading the model and
    again, for real, once every argument has been checked, so a bad flag never costs an old run.
    """
    run_dir = Path(root) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        if resume and (run_dir / RESUME_STATE).is_file():
            return run_dir
        if overwrite:  # start clean: stale files of the old run must not mix with the new one
            if not check_only:
                shutil.rmtree(run_dir)
                run_dir.mkdir(parents=True)
            return run_dir
        hint = "pass --resume to continue it, " if (run_dir / RESUME_STATE).is_file() else ""
        raise UsageError(f"run folder '{run_dir}' already exists; {hint}pass --overwrite to replace it, "
                         "or choose another --run_name")
    if resume:
        raise UsageError(f"nothing to resume: '{run_dir / RESUME_STATE}' does not exist; drop --resume")
    if not check_only:
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def write_run_config(run_dir, model_config, run_args, base):
    """``config.yaml``: the base model's config with ``run:`` and ``base_model:`` sections added."""
    config = OmegaConf.merge(model_config, {"run": run_args, "base_model": base})
    with atomic_path(Path(run_dir) / "config.yaml") as tmp:
        OmegaConf.save(config, tmp)


def save_trained_params(run_dir, state_dict, metadata):
    """Write the trained parameters (CompVis keys) as safetensors, atomically."""
    atomic_save_safetensors(state_dict, Path(run_dir) / TRAINED_PARAMS, metadata)


def apply_trained_params(model, path):
    """Copy a run's trained parameters into ``model``; every key must exist with the same shape."""
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
    """The file of one concept's separable term: ``term-<concept, lowercase, non-alphanumerics as ->.safetensors``."""
    slug = re.sub(r"[^a-z0-9]+", "-", concept.lower()).strip("-") or "concept"
    return f"{TERM_PREFIX}{slug}.safetensors"


def term_files(run_dir):
    """A run's separable-term files, in name order."""
    return sorted(Path(run_dir).glob(f"{TERM_PREFIX}*.safetensors"))


def term_concepts(run_dir):
    """``{concept: term file}`` of a run, read from the files' metadata alone (no tensors loaded)."""
    from safetensors import safe_open
    concepts = {}
    for path in term_files(run_dir):
        with safe_open(str(path), "pt") as f:
            concept = (f.metadata() or {}).get("concept")
        if concept is None:
            raise UsageError(f"'{path}' is not a separable term (no concept in its metadata)")
        concepts[concept] = path
    return concepts


def read_term(path):
    """One term file: ``(tensors, metadata)``; the metadata names at least ``concept``."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    if "concept" not in metadata:
        raise UsageError(f"'{path}' is not a separable term (no concept in its metadata)")
    return load_file(str(path)), metadata


def save_term(run_dir, concept, tensors, metadata):
    """Write one concept's term atomically; returns its path."""
    return atomic_save_safetensors(tensors, Path(run_dir) / term_file_name(concept), {**metadata, "concept": concept})


def run_method(run_dir):
    """The method a run folder records (``run.method``); None when the folder is not a run."""
    config_path = Path(run_dir) / "config.yaml"
    if not config_path.is_file():
        return None
    config = load_config(config_path)
    if config.get("base_model") is None or config.get("run") is None:
        return None
    return config.run.get("method")


def is_run_dir(folder):
    """Whether ``folder`` is a run folder (an edit over a named base model)."""
    return run_method(folder) is not None


# How each method's edit is applied over the base model: a function (model, run_dir) -> model,
# named as a dotted path so that a method's module loads only when one of its runs does.
EDITS = {
    "esd": "ldm.erasure.runs.apply_trained_params_of",
    "cie": "ldm.erasure.runs.apply_trained_params_of",
    "sepce": "ldm.erasure.sepce.apply_terms_of",
    "cpe": "ldm.erasure.cpe.apply_resags_of",
}


def apply_trained_params_of(model, run_dir):
    """The overlay edit (ESD, CiE): the run's trained parameters replace the base's."""
    return apply_trained_params(model, Path(run_dir) / TRAINED_PARAMS)


def apply_edit(model, run_dir, method):
    """Apply a run's edit to its base ``model`` by the run's recorded ``method``."""
    from ldm.util import get_obj_from_str
    if method not in EDITS:
        raise UsageError(f"run '{Path(run_dir).name}' records method '{method}', which this version cannot load "
                         f"(known: {', '.join(EDITS)})")
    return get_obj_from_str(EDITS[method])(model, run_dir)


def run_files(run_dir):
    """The files that define a run's edit: its config, trained parameters or terms, and model.ckpt (an
    exported single file beside them is an output, not part of the edit)."""
    run_dir = Path(run_dir)
    files = {"config.yaml": run_dir / "config.yaml"}
    for path in [run_dir / TRAINED_PARAMS, *term_files(run_dir), run_dir / "model.ckpt"]:
        if path.is_file():
            files[path.name] = path
    return files


def find_run(name, flag, methods=None):
    """The folder of run ``name`` (under models/, or a path) for ``flag``; one line when there is none,
    or when its method is not one of ``methods``."""
    folder = Path(name) if Path(name).is_dir() else MODELS_DIR / str(name)
    method = run_method(folder) if folder.is_dir() else None
    if method is None:
        runs = sorted(p.name for p in MODELS_DIR.iterdir() if run_method(p) in (methods or EDITS))
        raise UsageError(f"{flag} '{name}': no such run (no run folder {folder}); runs here: "
                         f"{', '.join(runs) or 'none'}")
    if methods and method not in methods:
        raise UsageError(f"{flag} '{name}' is a {method} run; it needs a run of {' or '.join(methods)}")
    return folder


def run_base_args(args, name, method):
    """Point ``args.config_path``/``args.ckpt_path`` at the base model of run ``name`` (``--on``) and set
    ``args.on_dir`` to its folder: a run built on another is built on the same base."""
    folder = find_run(name, "--on", [method])
    base = load_config(folder / "config.yaml").base_model
    args.config_path, args.ckpt_path, args.on_dir = base.config_path, base.ckpt_path, str(folder)
    return folder


def restore_concept(run_dir, concept, new_name, overwrite=False, root=MODELS_DIR):
    """Write run ``root/new_name``: ``run_dir`` with ``concept``'s separable term dropped (every other term
    and the config kept; ``run.restored`` lists what was dropped). Dropping every term gives the base model."""
    run_dir = Path(run_dir)
    if (Path(root) / new_name).resolve() == run_dir.resolve():
        raise UsageError("--run_name must differ from --model_name: a restore writes a new run")
    terms = term_concepts(run_dir)
    if not terms:
        raise UsageError(f"run '{run_dir.name}' has no separable terms (it is a {run_method(run_dir)} run); "
                         "only runs whose concepts are separate terms (SepCE, CPE) can restore one")
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
    return new_dir


def check_base(run_dir, base, force_base=False):
    """The base checkpoint a run names, refused unless its SHA-256 is the one the run was trained on."""
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


def load_run(run_dir, device="cpu", unsafe_pickle=False, force_base=False):
    """The edited model of a run folder (its whole ``model.ckpt`` when saved, else the base with the
    run's edit applied) as a ``LoadedModel`` whose identity holds the run's files and its base's."""
    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml")
    base = config.get("base_model")
    if (run_dir / "model.ckpt").is_file():
        model = load_model_from_config(config, run_dir / "model.ckpt", device, unsafe_pickle)
        return LoadedModel(model, "run", run_dir.name, make_identity("run", run_files(run_dir)), run_dir, config)
    if base is None:
        raise UsageError(f"'{run_dir}/config.yaml' has no base_model: section; it is not a run folder")
    ckpt = check_base(run_dir, base, force_base)
    model = load_model_from_config(config, ckpt, "cpu", unsafe_pickle)
    apply_edit(model, run_dir, config.run.method)
    identity = make_identity("run", run_files(run_dir), base=make_identity("compvis", {"checkpoint": ckpt}))
    return LoadedModel(model.to(device).eval(), "run", run_dir.name, identity, run_dir, config)


def load_run_base(loaded, device="cpu", unsafe_pickle=False):
    """The model a loaded run edits (its recorded base, checked by SHA-256); any other model is its own base."""
    if loaded.kind != "run" or loaded.config.get("base_model") is None:
        return loaded
    from ldm.loading import load_compvis
    base = loaded.config.base_model
    return load_compvis(base.config_path, check_base(loaded.folder, base), device, unsafe_pickle)


def check_resume(run_dir, run_args, base, ignored=("resume", "overwrite", "save_every", "devices", "no_diffusers",
                                                   "save_compvis", "mixed_precision", "gradient_checkpointing")):
    """Refuse to resume a run with other arguments or on another base checkpoint than it started with."""
    recorded = load_config(Path(run_dir) / "config.yaml")
    old = {k: v for k, v in OmegaConf.to_container(recorded.get("run", {})).items() if k not in ignored}
    new = OmegaConf.to_container(OmegaConf.create({k: v for k, v in run_args.items() if k not in ignored}))
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
    """The resumable state, loaded safely (tensors and plain values only)."""
    return torch.load(Path(run_dir) / RESUME_STATE, map_location="cpu", weights_only=True)


def run_training(trainer, iterations, run_dir, save_every=0, progress=True):
    """Step ``trainer`` (an ``ErasureTrainer``) up to ``iterations`` or until its stop rule ends it,
    writing the resumable state every ``save_every`` iterations and at the end. A failing step leaves
    the last good state on disk and re-raises."""
    from tqdm.auto import tqdm
    with tqdm(total=iterations, initial=trainer.iteration, desc="erasing", disable=not progress) as bar:
        while trainer.iteration < iterations and not trainer.stopped:
            try:
                loss = trainer.step()
            except Exception:
                save_resume_state(run_dir, trainer.state_dict())
                raise
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}")
            if save_every and trainer.iteration % save_every == 0:
                save_resume_state(run_dir, trainer.state_dict())
    save_resume_state(run_dir, trainer.state_dict())
    return trainer


def add_run_args(parser):
    """The flags every train script shares: devices, precision, naming, resuming and outputs."""
    parser.add_argument("--devices", default="0" if torch.cuda.is_available() else "cpu",
                        help="cpu, 0, or 0,1: the frozen teacher as a whole UNet copy on the second (cpu,cpu "
                             "too); one device keeps one UNet and copies only the trained weights")
    parser.add_argument("--mixed_precision", default="auto", choices=["auto", "no", "bf16", "fp16"],
                        help="autocast (auto: bf16 on a GPU where supported, fp16 otherwise; none on the CPU, "
                             "where bf16 or fp16 must be asked for); weights and Adam's state stay fp32")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save_every", type=int, default=100, help="iterations between resumable checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue a killed run of the same name")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    parser.add_argument("--save_compvis", action="store_true", help="also write the whole CompVis model.ckpt")
    parser.add_argument("--no_diffusers", action="store_true", help="skip the diffusers folder")
    return parser


def parse_devices(text):
    """``--devices``: one device, or two (student, frozen teacher)."""
    from ldm.cli import parse_device
    devices = [parse_device(d) for d in str(text).split(",")]
    if len(devices) > 2:
        raise UsageError("--devices takes one or two devices, e.g. 0 or 0,1")
    return devices


def autocast_dtype(choice, device):
    """The autocast dtype ``--mixed_precision`` asks for on ``device`` (None: full fp32)."""
    if choice == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]


def load_base(args, device):
    """The base CompVis model of a train script (``--config_path``/``--ckpt_path``) as a ``LoadedModel``
    (with its identity), ``--gradient_checkpointing`` applied."""
    from ldm.loading import load_compvis
    loaded = load_compvis(args.config_path, args.ckpt_path, device, args.unsafe_pickle)
    if args.gradient_checkpointing:
        loaded.model.model.diffusion_model.set_gradient_checkpointing(True)
    return loaded


def train_run(trainer, name, method, args, config, iterations, title, words, image_size, metadata=None):
    """Everything a train script does once its trainer is built: the run folder (``--resume``,
    ``--overwrite``), its config record, the training loop, the edit, the loss curve, a before/after
    grid, ``training.json`` (iterations run, whether the stop rule ended it, seconds) and the optional
    CompVis and diffusers exports. Returns the run folder."""
    import json
    import time

    from ldm.convert import save_diffusers
    from ldm.training import export_checkpoint
    run_dir = prepare_run_dir(name, resume=args.resume, overwrite=args.overwrite)  # every argument checked
    run_args = {"method": method, **vars(args), **trainer.settings.as_dict()}
    base = base_identity(args.config_path, args.ckpt_path)
    if args.resume:
        check_resume(run_dir, run_args, base)
        trainer.load_state_dict(load_resume_state(run_dir))
    write_run_config(run_dir, config, run_args, base)

    started = time.perf_counter()
    run_training(trainer, iterations, run_dir, args.save_every)
    seconds = time.perf_counter() - started

    trainer.save_edit(run_dir, {"method": method, **(metadata or {})})
    write_losses(run_dir, trainer.losses, title=title)
    summary = {"iterations": trainer.iteration, "stopped_by_rule": bool(trainer.stopped),
               "training_seconds_this_process": round(seconds, 2), **trainer.summary()}
    atomic_write_text(run_dir / "training.json", json.dumps(summary, indent=2))
    model = trainer.edited_model().eval()
    save_before_after_grid(model, trainer.without_edit, comparison_prompts(words), run_dir / "samples.png",
                           image_size=image_size)
    if args.save_compvis:
        export_checkpoint(model, run_dir / "model.ckpt", half=False)
    if not args.no_diffusers:
        save_diffusers(model, config, run_dir / "diffusers", overwrite=True)
    return run_dir


def write_losses(run_dir, losses, title="loss"):
    """``loss.txt`` (one loss per iteration) and ``loss.png``."""
    from ldm.plots import save_loss_plot
    with atomic_path(Path(run_dir) / "loss.txt") as tmp:
        tmp.write_text("".join(f"{x}\n" for x in losses))
    save_loss_plot(range(1, len(losses) + 1), losses, Path(run_dir) / "loss.png", title=title,
                   smooth=max(1, min(50, len(losses) // 5)))


GENERIC_PROMPTS = ("a photo of a dog on the beach", "a painting of a lighthouse at dusk", "a city street at night")


def comparison_prompts(words, others=3):
    """Prompts for a before/after grid: the erased concepts, then a few unrelated prompts (tiny-sd
    concepts get tiny-sd prompts with and without them)."""
    from ldm.data.prompt_sets import all_concepts, concept_prompts
    if all(w in all_concepts() for w in words):
        erased, unrelated = [], []
        for word in words[:2]:
            table = concept_prompts(word)
            erased += table[table.set == "alone"].prompt.tolist()[:1] + table[table.set == "with_others"].prompt.tolist()[:1]
            unrelated += table[table.set == "without"].prompt.tolist()[:others]
        return erased + unrelated[:others]
    return list(words[:3]) + list(GENERIC_PROMPTS[:others])


@torch.no_grad()
def save_before_after_grid(model, without_edit, prompts, path, seeds=(0, 1), **generate_kwargs):
    """A grid of ``prompts`` (rows) for the base and the edited model (columns, per seed).

    ``without_edit``: a context manager (``ErasureTrainer.without_edit``) within which ``model`` draws as
    the base model, so a single model serves both.
    """
    from ldm.generate import generate_grid
    from ldm.plots import save_image_grid
    columns = []
    for label in ("before", "after"):
        with (without_edit() if label == "before" else contextlib.nullcontext()):
            for seed in seeds:
                images = generate_grid(model, [[p] for p in prompts], seed=seed * 1000, **generate_kwargs)
                columns.append((f"{label} (seed {seed})", images[:, 0]))
    images = torch.stack([torch.from_numpy(c[1]) for c in columns], dim=1).numpy()
    return save_image_grid(images, path, row_labels=list(prompts), col_labels=[c[0] for c in columns],
                           title="before / after erasure")
