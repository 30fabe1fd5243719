"""Erase a concept with CiE, Concept-irrelevant Erasure (Zhao et al. 2024); tiny-sd by default.

    python train-scripts/train-cie.py --prompt 'Van Gogh'
    python train-scripts/train-cie.py --prompt 'Van Gogh' --data_dir data/train/Van_Gogh \\
        --config_path configs/stable-diffusion/v1-inference.yaml --ckpt_path sd-v1-4-full-ema.ckpt --devices 0

Training images of the concept come from --data_dir (eval-scripts/generate-data.py) or, without it, are
drawn by the base model once and cached by its identity. Writes models/<run_name>/ as train-esd.py does
(trained-params.safetensors with the attn2 weights, config.yaml, loss.png, samples.png, diffusers/)
plus training.json (iterations run, the stop rule's iteration, seconds).
"""
from ldm.cli import add_model_args, new_parser, run
from ldm.erasure.cie import (CiESettings, CiETrainer, add_cie_args, fill_defaults, prepare_training_latents,
                             templates_of)
from ldm.erasure.runs import add_run_args, autocast_dtype, load_base, parse_devices, prepare_run_dir, train_run
from ldm.generate import pixel_size
from ldm.util import load_config


def main():
    parser = add_cie_args(add_run_args(add_model_args(new_parser(__doc__))))
    parser.add_argument("--run_name", help="default: cie-word_<prompt>-lr_<lr>-tau_<tau>-iter_<cap>")
    args = parser.parse_args()

    config = load_config(args.config_path)
    fill_defaults(args, config.get("cie_defaults", {}))
    devices = parse_devices(args.devices)
    name = args.run_name or f"cie-word_{args.prompt.replace(' ', '')}-lr_{args.lr}-tau_{args.tau}-iter_{args.iterations}"
    prepare_run_dir(name, resume=args.resume, overwrite=args.overwrite, check_only=True)

    loaded = load_base(args, devices[0])
    latents, data = prepare_training_latents(loaded, args.prompt, args.data_dir, args.num_images)
    settings = CiESettings(concept=args.prompt, data=data, iterations=args.iterations, lr=args.lr,
                           l1_weight=args.l1_weight, tau=args.tau, warmup=args.warmup, batch_size=args.batch_size,
                           seed=args.seed,
                           prompt_templates=templates_of(args.prompt_templates))
    trainer = CiETrainer(loaded.model, settings, latents, devices[0], devices[1] if len(devices) == 2 else None,
                         autocast_dtype(args.mixed_precision, devices[0]))
    image_size = pixel_size(loaded.model)
    run_dir = train_run(trainer, name, "cie", args, config, settings.iterations, f"CiE: {args.prompt}",
                        [args.prompt], image_size, {"prompt": args.prompt})
    stop = trainer.rule.stop_iteration
    print(f"erased {args.prompt} (CiE, {'stopped by the rule at iteration ' + str(stop) if stop else 'iteration cap'}); "
          f"run written to {run_dir}")


if __name__ == "__main__":
    run(main)
