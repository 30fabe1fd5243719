"""Erase a concept with ESD (Gandikota et al. 2023); tiny-sd by default.

    python train-scripts/train-esd.py --prompt 'Van Gogh' --train_method xattn
    python train-scripts/train-esd.py --prompt nudity --train_method noxattn \\
        --config_path configs/stable-diffusion/v1-inference.yaml --ckpt_path sd-v1-4-full-ema.ckpt --devices 0

Writes models/<run_name>/: trained-params.safetensors (the trained parameters alone), config.yaml
(every argument and the base model's identity), loss.txt, loss.png, samples.png (before/after),
diffusers/ (unless --no_diffusers), model.ckpt (with --save_compvis) and checkpoints/last.pt
(resumable with --resume).
"""
import torch

from ldm.cli import add_model_args, new_parser, parse_device, run
from ldm.convert import save_diffusers
from ldm.erasure.esd import (DEFAULT_PROMPT_TEMPLATES, ESDSettings, ESDTrainer, canonical_method,
                             concept_words, read_prompt_templates, run_name, with_defaults)
from ldm.erasure.runs import (base_identity, check_resume, comparison_prompts, load_resume_state, prepare_run_dir,
                              run_training, save_before_after_grid, save_trained_params, write_losses,
                              write_run_config)
from ldm.generate import latent_shape
from ldm.training import export_checkpoint
from ldm.loading import load_compvis
from ldm.util import UsageError, load_config


def main():
    parser = add_model_args(new_parser(__doc__))
    parser.add_argument("--prompt", required=True, help="concept to erase, or a macro: allartist, i2p, artifact")
    parser.add_argument("--train_method", default="xattn",
                        help="xattn (esd-x), noxattn (esd-u), selfattn, full (esd-all), notime, xlayer, "
                             "selflayer, esd-x-strict")
    parser.add_argument("--start_guidance", type=float, help="CFG scale sampling x_t (default 3)")
    parser.add_argument("--negative_guidance", type=float,
                        help="eta in the original's target eps(\"\") - eta (eps(c) - eps(\"\")) (default 1 for SD v1, the "
                             "model config's esd_defaults); the "
                             "authors' later code writes eps(c) - eta' (eps(c) - eps(\"\")), so its eta' = 2 is eta = 1 here")
    parser.add_argument("--iterations", type=int, help="default 1000 (SD v1), the model config's esd_defaults")
    parser.add_argument("--lr", type=float, help="default 1e-5 (SD v1), the model config's esd_defaults")
    parser.add_argument("--ddim_steps", type=int, help="default 50")
    parser.add_argument("--image_size", type=int, help="pixels (default: the model's own size)")
    parser.add_argument("--devices", default="0" if torch.cuda.is_available() else "cpu",
                        help="cpu, 0, or 0,1: the frozen teacher as a whole UNet copy on the second (cpu,cpu "
                             "too); one device keeps one UNet and copies only the trained weights")
    parser.add_argument("--seperator", help="split --prompt on this to erase several concepts (e.g. ',')")
    parser.add_argument("--prompt_templates", nargs="?", const=str(DEFAULT_PROMPT_TEMPLATES), metavar="FILE",
                        help="train on phrasings of the concept, one template a line with {} (bare flag: "
                             "data/esd-prompt-templates.txt); default: the bare concept, as the paper")
    parser.add_argument("--erase_from", help="erase the concept only where it appears with this one (x_t drawn with it, "
                                             "the student conditioned on it); erasure-report.py then reports it")
    parser.add_argument("--sample_from", choices=["esd", "base"],
                        help="who samples x_t: the model being trained (the original; default for SD v1) or the "
                             "frozen one (the authors' later code); default: the model config's esd_defaults")
    parser.add_argument("--targets_per_trajectory", type=int,
                        help="with --sample_from base: training targets taken from one sampling trajectory "
                             "(default 1 for SD v1, the model config's esd_defaults)")
    parser.add_argument("--mixed_precision", default="auto", choices=["auto", "no", "bf16", "fp16"],
                        help="autocast (auto: bf16 on a GPU where supported, fp16 otherwise; none on the CPU, "
                             "where bf16 or fp16 must be asked for); weights and Adam's state stay fp32")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--run_name", help="default: the original naming compvis-word_<prompt>-method_<m>-...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save_every", type=int, default=100, help="iterations between resumable checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue a killed run of the same name")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    parser.add_argument("--save_compvis", action="store_true", help="also write the whole CompVis model.ckpt")
    parser.add_argument("--no_diffusers", action="store_true", help="skip the diffusers folder")
    args = parser.parse_args()

    words = concept_words(args.prompt, args.seperator)
    method = canonical_method(args.train_method)
    config = load_config(args.config_path)
    for key, value in with_defaults(vars(args), config.get("esd_defaults", {})).items():
        setattr(args, key, value)
    devices = [parse_device(d) for d in args.devices.split(",")]
    if len(devices) > 2:
        raise UsageError("--devices takes one or two devices, e.g. 0 or 0,1")
    name = args.run_name or run_name(args.prompt, args.train_method, args.start_guidance, args.negative_guidance,
                                     args.iterations, args.lr)
    prepare_run_dir(name, resume=args.resume, overwrite=args.overwrite, check_only=True)

    model = load_compvis(args.config_path, args.ckpt_path, devices[0], args.unsafe_pickle).model
    if args.gradient_checkpointing:
        model.model.diffusion_model.set_gradient_checkpointing(True)
    image_size = args.image_size or latent_shape(model)[-1] * 2 ** model.num_downs
    settings = ESDSettings(words=words, train_method=method, start_guidance=args.start_guidance,
                           negative_guidance=args.negative_guidance, iterations=args.iterations, lr=args.lr,
                           ddim_steps=args.ddim_steps, image_size=image_size, sample_from=args.sample_from,
                           erase_from=args.erase_from, targets_per_trajectory=args.targets_per_trajectory,
                           seed=args.seed,
                           prompt_templates=read_prompt_templates(args.prompt_templates) if args.prompt_templates else None)
    precision = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    if args.mixed_precision == "auto" and devices[0].type == "cuda":
        precision = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    trainer = ESDTrainer(model, settings, devices[0], devices[1] if len(devices) == 2 else None, precision)
    run_dir = prepare_run_dir(name, resume=args.resume, overwrite=args.overwrite)  # every argument checked
    run_args, base = {"method": "esd", **vars(args), **settings.as_dict()}, base_identity(args.config_path, args.ckpt_path)
    if args.resume:
        check_resume(run_dir, run_args, base)
        trainer.load_state_dict(load_resume_state(run_dir))
    write_run_config(run_dir, config, run_args, base)

    run_training(trainer, settings.iterations, run_dir, args.save_every)

    save_trained_params(run_dir, trainer.trained_state(), {"method": "esd", "train_method": method,
                                                           "prompt": args.prompt})
    write_losses(run_dir, trainer.losses, title=f"ESD {method}: {args.prompt}")
    model.eval()
    save_before_after_grid(model, trainer.teacher.original_values(trainer.trained_names),
                           comparison_prompts(words), run_dir / "samples.png", image_size=image_size)
    if args.save_compvis:
        export_checkpoint(model, run_dir / "model.ckpt", half=False)
    if not args.no_diffusers:
        save_diffusers(model, config, run_dir / "diffusers", overwrite=True)
    print(f"erased {', '.join(words)} ({method}); run written to {run_dir}")


if __name__ == "__main__":
    run(main)
