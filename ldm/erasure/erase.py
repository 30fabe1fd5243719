"""Erasing from the command line, for every method: a method's flags built from its settings dataclass,
its settings resolved (flag > the model config's per-method block > the paper's default), the base
model loaded, its trainer built by the registry, trained, and its run folder written.

    train-scripts/erase.py --method esd-x --prompt 'Van Gogh'     # any registered method
    train-scripts/train-esd.py --prompt 'Van Gogh'               # the original ESD script's flags
"""
import json
import shlex
import time

import torch

from ldm.cli import DEFAULT_CKPT, DEFAULT_CONFIG, add_model_args, new_parser, parse_device
from ldm.convert import export_checkpoint, save_diffusers
from ldm.erasure import methods
from ldm.erasure.concept_data import prepare_training_latents
from ldm.erasure.outputs import comparison_prompts, save_before_after_grid, write_losses
from ldm.erasure.settings import add_setting_args, describe, model_config_defaults, resolve
from ldm.erasure.trainer import run_training
from ldm.generate import pixel_size
from ldm.loading import load_compvis
from ldm.paths import TINY_SD_DIR
from ldm.runs import (base_identity, check_resume, check_run_name, finish_run_dir, load_resume_state,
                      prepare_run_dir, write_run_config)

from ldm.util import UsageError, atomic_write_text, load_config


def add_run_args(parser, method):
    """The flags of a run (devices, naming, resuming, outputs) that ``method`` uses; --mixed_precision and
    --gradient_checkpointing only for methods that run the UNet."""
    parser.add_argument("--devices", default="0" if torch.cuda.is_available() else "cpu",
                        help="cpu, 0, or 0,1: the frozen teacher as a whole UNet copy on the second (cpu,cpu too); "
                             "one device keeps one UNet and copies only the trained weights"
                        if method.max_devices > 1 else "the one device it trains on: cpu, 0, cuda:1")
    if method.mixed_precision:
        parser.add_argument("--mixed_precision", default="auto", choices=["auto", "no", "bf16", "fp16"],
                            help="autocast (auto: bf16 on a GPU where supported, fp16 otherwise; none on the CPU, "
                                 "where bf16 or fp16 must be asked for); weights and Adam's state stay fp32")
        parser.add_argument("--gradient_checkpointing", action="store_true",
                            help="recompute activations in the backward pass: less memory, more time")
    parser.add_argument("--save_every", type=int, default=100, help="iterations between resumable checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue a killed run of the same name")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    parser.add_argument("--save_compvis", action="store_true", help="also write the whole CompVis model.ckpt")
    parser.add_argument("--no_diffusers", action="store_true", help="skip the diffusers folder")
    parser.add_argument("--no_samples", action="store_true", help="skip samples.png, the before/after grid")
    parser.add_argument("--run_name", help="the run's folder under the models folder (default: the method's naming)")
    parser.add_argument("--show_settings", action="store_true",
                        help="print the resolved settings and where each came from, then exit (loads no model)")
    return parser


def method_parser(method, description, variant_flag=False):
    """The parser of one method: model, run and settings flags; ``variant_flag`` adds ESD's ``--train_method``,
    which picks the variant as in the original script. Each setting's help shows the default model's value."""
    parser = add_run_args(add_model_args(new_parser(description)), method)
    if variant_flag:
        parser.add_argument("--train_method", default=method.fixed["train_method"],
                            help="the ESD variant: xattn (esd-x), noxattn (esd-u), selfattn, full (esd-all), "
                                 "notime, xlayer, selflayer, xattn-strict (esd-x-strict)")
    tiny = model_config_defaults(method.settings, load_config(TINY_SD_DIR / "config.yaml"), method.config_blocks)
    return add_setting_args(parser, method.settings, method.fixed, {k: v for k, (v, _) in tiny.items()})


def parse_method_args(parser, method, argv):
    """Parse ``argv``; a flag that is another method's setting is one line saying so, never ignored."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next((u for u in unknown if u.startswith("--")), unknown[0]).split("=")[0]
        owners = [m.name for m in methods.REGISTRY if flag[2:] in m.flag_names()]
        if owners:
            raise UsageError(f"{flag} is not a flag of {method.name} (methods that take it: {', '.join(owners)}); "
                             f"see --help for {method.name}'s flags")
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def parse_devices(text, most=2):
    """``--devices``: one device, or two (student, frozen teacher) where the method allows."""
    devices = [parse_device(d) for d in str(text).split(",")]
    if len(devices) > most:
        raise UsageError("--devices takes one device here, e.g. 0 or cpu (the method keeps no teacher copy)" if most == 1
                         else "--devices takes one or two devices, e.g. 0 or 0,1")
    return devices


def autocast_dtype(choice, device):
    """The autocast dtype ``--mixed_precision`` asks for on ``device`` (None: full fp32)."""
    if choice == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]


def resolve_settings(method, args):
    """The run's settings and their sources; a method that builds on an earlier run (SepCE ``--on``) points
    ``args.config_path``/``args.ckpt_path`` at that run's base first."""
    flags = vars(args)
    base = method.base_of(flags) if method.base_of else None
    if base is not None:
        args.config_path, args.ckpt_path = base
    config = load_config(args.config_path)
    settings, sources = resolve(method.settings, flags, config, method.config_blocks, method.fixed)
    return settings, sources, config


def run_settings(method_name, argv):
    """The settings an erase of ``method_name`` with flags ``argv`` runs with (flag > model config > paper), as
    a dict; loads no model. The benchmark keys its cells by them, so a changed default reruns a cell."""
    method = methods.get(method_name)
    parser = method_parser(method, method.description)

    def refuse(message):  # one line naming the flags, not the erase parser's usage
        raise UsageError(f"{method_name} flags {shlex.join(map(str, argv))}: {message}")
    parser.error = refuse
    settings, _, _ = resolve_settings(method, parse_method_args(parser, method, list(map(str, argv))))
    return settings.as_dict()


def erase(method, args):
    """Everything an erase does once its flags are parsed; returns the run folder (None for --show_settings)."""
    settings, sources, config = resolve_settings(method, args)
    if args.show_settings:
        print(f"{method.name} settings (flag > model config {' > '.join(reversed(method.config_blocks))} > paper):")
        print(describe(settings, sources))
        return None
    devices = parse_devices(args.devices, method.max_devices)
    if args.save_every < 0:
        raise UsageError(f"--save_every must be >= 0, got {args.save_every}")
    name = check_run_name(args.run_name or method.run_name(settings))
    prepare_run_dir(name, resume=args.resume, overwrite=args.overwrite, check_only=True)

    loaded = load_compvis(args.config_path, args.ckpt_path, devices[0], args.unsafe_pickle)
    if getattr(args, "gradient_checkpointing", False):
        loaded.model.model.diffusion_model.set_gradient_checkpointing(True)
    record = {}

    def latents():  # the concept's training images, drawn or read only once the trainer has checked the rest
        tensor, record["data"] = prepare_training_latents(loaded, settings.prompt, settings.data_dir,
                                                          settings.num_images)
        return tensor

    trainer = method.build(settings, loaded.model, devices, autocast_dtype(getattr(args, "mixed_precision", "no"),
                                                                           devices[0]), latents)
    for line in trainer.describe():
        print(line)
    record["resume_command"] = resume_command(method, settings, sources, args, name)
    run_dir = train_run(trainer, name, method, settings, args, config, {**record, **trainer.record()})
    stop = getattr(getattr(trainer, "rule", None), "stop_iteration", None)
    ended = f", stopped by the rule at iteration {stop}" if stop else ""
    print(f"erased {', '.join(settings.concepts())} ({method.name}{ended}); run written to {run_dir}")
    return run_dir


def resume_command(method, settings, sources, args, name):
    """The command that resumes this run after a kill: the method, the settings given as flags, the base model
    when it is not the default one, and --resume."""
    given = [a for key, source in sources.items() if source == "flag" for a in (f"--{key}", str(getattr(settings, key)))]
    base = ([] if (str(args.config_path), str(args.ckpt_path)) == (str(DEFAULT_CONFIG), str(DEFAULT_CKPT)) else
            ["--config_path", str(args.config_path), "--ckpt_path", str(args.ckpt_path)])
    return shlex.join(["python3", "train-scripts/erase.py", "--method", method.name, *given, *base, "--run_name", name,
                       "--resume"])


def train_run(trainer, name, method, settings, args, config, record):
    """Everything once the trainer is built: the run folder (``--resume``, ``--overwrite``), its config record,
    the training loop, the edit, the loss curve, a before/after grid, ``training.json`` (iterations run,
    whether the stop rule ended it, seconds) and the optional CompVis and diffusers exports."""
    run_dir = prepare_run_dir(name, resume=args.resume, overwrite=args.overwrite)  # every argument checked; built
    # in .<name>.partial and renamed into place at the end, so a kill never leaves half a run under its name
    run_flags = {k: v for k, v in vars(args).items() if k not in settings.as_dict()}
    run_args = {"method": method.name, **run_flags, **settings.as_dict(), **record}
    base = base_identity(args.config_path, args.ckpt_path)
    if args.resume:
        check_resume(run_dir, run_args, base)
        trainer.load_state_dict(load_resume_state(run_dir))
    write_run_config(run_dir, config, run_args, base)

    started = time.perf_counter()
    run_training(trainer, trainer.total_iterations(), run_dir, args.save_every)
    seconds = time.perf_counter() - started

    trainer.save_edit(run_dir, {"method": method.name, "prompt": settings.prompt})
    write_losses(run_dir, trainer.losses, title=f"{method.name}: {settings.prompt}")
    summary = {"iterations": trainer.iteration, "stopped_by_rule": bool(trainer.stopped),
               "training_seconds_this_process": round(seconds, 2), **trainer.summary()}
    atomic_write_text(run_dir / "training.json", json.dumps(summary, indent=2))
    model = trainer.edited_model().eval()
    if not args.no_samples:
        image_size = getattr(settings, "image_size", None) or pixel_size(model)
        save_before_after_grid(model, trainer.without_edit, comparison_prompts(settings.concepts()),
                               run_dir / "samples.png", image_size=image_size)
    if args.save_compvis:
        export_checkpoint(model, run_dir / "model.ckpt", half=False)
    if not args.no_diffusers:
        save_diffusers(model, config, run_dir / "diffusers", overwrite=True)
    return finish_run_dir(run_dir)


def main(argv=None, method_name=None, description=__doc__):
    """``erase.py``: ``--method M`` picks the method (or ``method_name`` fixes it, as the per-method scripts do)."""
    if method_name is None:
        picker = new_parser(description, add_help=False)  # --help is the method's, once one is named
        picker.add_argument("--method", choices=list(methods.METHODS), help="; ".join(
            f"{m.name}: {m.description}" for m in methods.REGISTRY))
        known, rest = picker.parse_known_args(argv)
        if known.method is None:
            if any(a in ("-h", "--help") for a in rest):
                picker.print_help()
                print("\nthen: erase.py --method M --help shows that method's flags")
                return None
            picker.error("--method is required: one of " + ", ".join(methods.METHODS))
        method_name, argv = known.method, rest
    method = methods.get(method_name)
    parser = method_parser(method, f"{method.description}.\n\n{description}")
    return erase(method, parse_method_args(parser, method, argv))
