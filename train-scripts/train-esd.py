"""Erase a concept with ESD (Gandikota et al. 2023); tiny-sd by default.

    python train-scripts/train-esd.py --prompt 'Van Gogh' --train_method xattn
    python train-scripts/train-esd.py --prompt nudity --train_method noxattn \\
        --config_path configs/stable-diffusion/v1-inference.yaml --ckpt_path sd-v1-4-full-ema.ckpt --devices 0

Writes models/<run_name>/: trained-params.safetensors (the trained parameters alone), config.yaml
(every argument and the base model's identity), loss.txt, loss.png, samples.png (before/after),
diffusers/ (unless --no_diffusers), model.ckpt (with --save_compvis) and checkpoints/last.pt
(resumable with --resume).
"""
from ldm.cli import add_model_args, new_parser, run
from ldm.erasure.esd import (DEFAULT_PROMPT_TEMPLATES, ESDSettings, ESDTrainer, canonical_method,
                             concept_words, read_prompt_templates, run_name, with_defaults)
from ldm.erasure.runs import add_run_args, autocast_dtype, load_base, parse_devices, prepare_run_dir, train_run
from ldm.generate import pixel_size
from ldm.util import load_config


def main():
    parser = add_run_args(add_model_args(new_parser(__doc__)))
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
    parser.add_argument("--run_name", help="default: the original naming compvis-word_<prompt>-method_<m>-...")
    args = parser.parse_args()

    words = concept_words(args.prompt, args.seperator)
    method = canonical_method(args.train_method)
    config = load_config(args.config_path)
    for key, value in with_defaults(vars(args), config.get("esd_defaults", {})).items():
        setattr(args, key, value)
    devices = parse_devices(args.devices)
    name = args.run_name or run_name(args.prompt, args.train_method, args.start_guidance, args.negative_guidance,
                                     args.iterations, args.lr)
    prepare_run_dir(name, resume=args.resume, overwrite=args.overwrite, check_only=True)

    model = load_base(args, devices[0]).model
    image_size = args.image_size or pixel_size(model)
    settings = ESDSettings(words=words, train_method=method, start_guidance=args.start_guidance,
                           negative_guidance=args.negative_guidance, iterations=args.iterations, lr=args.lr,
                           ddim_steps=args.ddim_steps, image_size=image_size, sample_from=args.sample_from,
                           erase_from=args.erase_from, targets_per_trajectory=args.targets_per_trajectory,
                           seed=args.seed,
                           prompt_templates=read_prompt_templates(args.prompt_templates) if args.prompt_templates else None)
    trainer = ESDTrainer(model, settings, devices[0], devices[1] if len(devices) == 2 else None,
                         autocast_dtype(args.mixed_precision, devices[0]))
    run_dir = train_run(trainer, name, "esd", args, config, settings.iterations, f"ESD {method}: {args.prompt}",
                        words, image_size, {"train_method": method, "prompt": args.prompt})
    print(f"erased {', '.join(words)} ({method}); run written to {run_dir}")


if __name__ == "__main__":
    run(main)
