"""Run folders of erasure methods: ``models/<run_name>/`` with the trained parameters, their config
and the base model's identity, loadable by name wherever a model is named.

    models/<run_name>/
      config.yaml                 the base model's CompVis config (model:) plus run: (every argument)
                                  and base_model: (config, checkpoint path, size, sha256)
      trained-params.safetensors  the trained parameters alone, CompVis keys; applied over the base
      model.ckpt                  optional (--save_compvis): the whole edited CompVis checkpoint
      checkpoints/last.pt         periodic resumable state (trained weights, optimizer, RNG)
"""
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from ldm.loading import LoadedModel, make_identity, sha256_of, warn
from ldm.paths import MODELS_DIR, resolve_path
from ldm.util import UsageError, atomic_path, atomic_save, dict_differences, load_config, load_model_from_config

TRAINED_PARAMS = "trained-params.safetensors"
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
    with atomic_path(Path(run_dir) / TRAINED_PARAMS) as tmp:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp),
                  metadata={k: str(v) for k, v in metadata.items()})


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


def is_run_dir(folder):
    """Whether ``folder`` is a run folder (trained parameters over a named base model)."""
    return (Path(folder) / TRAINED_PARAMS).is_file() and (Path(folder) / "config.yaml").is_file()


def run_files(run_dir):
    """The files that define a run's edit: its config and every weights file at the top of the folder."""
    run_dir = Path(run_dir)
    files = {"config.yaml": run_dir / "config.yaml"}
    for path in sorted(run_dir.glob("*.safetensors")) + [run_dir / "model.ckpt"]:
        if path.is_file():
            files[path.name] = path
    return files


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
    """The edited model of a run folder (its whole ``model.ckpt`` when saved, else base + trained
    parameters) as a ``LoadedModel`` whose identity holds the run's files and its base's."""
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
    apply_trained_params(model, run_dir / TRAINED_PARAMS)
    identity = make_identity("run", run_files(run_dir), base=make_identity("compvis", {"checkpoint": ckpt}))
    return LoadedModel(model.to(device).eval(), "run", run_dir.name, identity, run_dir, config)


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
    """Step ``trainer`` (anything with ``step()``, ``iteration``, ``state_dict()``) up to ``iterations``,
    writing the resumable state every ``save_every`` iterations and at the end. A failing step
    leaves the last good state on disk and re-raises."""
    from tqdm.auto import tqdm
    with tqdm(total=iterations, initial=trainer.iteration, desc="erasing", disable=not progress) as bar:
        while trainer.iteration < iterations:
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
def save_before_after_grid(model, original_params, prompts, path, seeds=(0, 1), **generate_kwargs):
    """A grid of ``prompts`` (rows) for the base and the edited model (columns, per seed).

    ``original_params``: the base values of the edited UNet parameters, swapped in for the "before"
    images and swapped back afterwards, so a single model serves both.
    """
    from ldm.generate import generate_grid
    from ldm.plots import save_image_grid
    unet = model.model.diffusion_model
    params = dict(unet.named_parameters())
    edited = {n: params[n].detach().clone() for n in original_params}
    columns = []
    for label, values in (("before", original_params), ("after", edited)):
        for name, value in values.items():
            params[name].copy_(value)
        for seed in seeds:
            images = generate_grid(model, [[p] for p in prompts], seed=seed * 1000, **generate_kwargs)
            columns.append((f"{label} (seed {seed})", images[:, 0]))
    images = torch.stack([torch.from_numpy(c[1]) for c in columns], dim=1).numpy()
    return save_image_grid(images, path, row_labels=list(prompts), col_labels=[c[0] for c in columns],
                           title="before / after erasure")
