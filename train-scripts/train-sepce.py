"""Erase a concept with SepCE, Separable Concept Erasure (Zhao et al. 2024); tiny-sd by default.

    python train-scripts/train-sepce.py --prompt 'Van Gogh'                     # keeps the other styles
    python train-scripts/train-sepce.py --prompt Seurat --on sepce-word_VanGogh --run_name sepce-VanGogh-Seurat
    python train-scripts/restore-concept.py --model_name sepce-VanGogh-Seurat --concept 'Van Gogh' \\
        --run_name sepce-Seurat-restored

The concept's term edits every cross-attention to_k/to_v only outside the text embeddings of "" and the
keep set (--keep; tiny-sd's default: every other value of the concept's attribute), so those prompts'
predictions stay the base model's. Writes models/<run_name>/ with one term-<concept>.safetensors per
erased concept (with --on, the earlier run's terms, unchanged), config.yaml, loss.png, samples.png,
training.json (null-space dimension, stop iteration, seconds) and diffusers/ (terms folded in).
"""
from ldm.cli import add_model_args, new_parser, run
from ldm.erasure.cie import (CIE_ORIGINAL_DEFAULTS, add_cie_args, fill_defaults, prepare_training_latents,
                             templates_of)
from ldm.erasure.runs import (add_run_args, autocast_dtype, load_base, parse_devices, prepare_run_dir, run_base_args,
                              train_run)
from ldm.erasure.sepce import (SEPCE_ORIGINAL_DEFAULTS, SepCESettings, SepCETrainer, default_keep, protected_set,
                               read_terms, term_basis)
from ldm.generate import pixel_size
from ldm.text_geometry import NULL_SPACE_RTOL
from ldm.util import UsageError, load_config


def main():
    parser = add_cie_args(add_run_args(add_model_args(new_parser(__doc__))))
    parser.add_argument("--keep", help="comma-separated concepts to protect exactly (with the empty prompt); "
                                       "default for tiny-sd concepts: every other value of the concept's attribute")
    parser.add_argument("--on", metavar="RUN", help="a SepCE run whose terms stay fixed: erase this concept on top")
    parser.add_argument("--beta", type=float, help="scale of the basis in alpha (beta S^T) (default 1, or sepce_defaults)")
    parser.add_argument("--rtol", type=float, default=NULL_SPACE_RTOL,
                        help="null space: singular directions below rtol x the largest count as null")
    parser.add_argument("--run_name", help="default: sepce-word_<prompt>[-on_<RUN>]")
    args = parser.parse_args()

    earlier = []
    if args.on:
        run_base_args(args, args.on, method="sepce")  # the base model and config are the earlier run's
        earlier = read_terms(args.on_dir)
    config = load_config(args.config_path)
    fill_defaults(args, config.get("sepce_defaults", {}), {**CIE_ORIGINAL_DEFAULTS, **SEPCE_ORIGINAL_DEFAULTS})
    keep = [k.strip() for k in args.keep.split(",")] if args.keep is not None else default_keep(args.prompt)
    devices = parse_devices(args.devices)
    if len(devices) > 1:
        raise UsageError("SepCE trains on one device (its frozen model is the loaded one); give one --devices entry")
    name = args.run_name or f"sepce-word_{args.prompt.replace(' ', '')}" + (f"-on_{args.on}" if args.on else "")
    settings = SepCESettings(concept=args.prompt, keep=keep, data={}, earlier=[t["concept"] for t in earlier],
                             beta=args.beta, rtol=args.rtol, iterations=args.iterations, lr=args.lr,
                             l1_weight=args.l1_weight, tau=args.tau, warmup=args.warmup, batch_size=args.batch_size,
                             seed=args.seed,
                           prompt_templates=templates_of(args.prompt_templates)).check()
    prepare_run_dir(name, resume=args.resume, overwrite=args.overwrite, check_only=True)

    loaded = load_base(args, devices[0])
    protected = protected_set(keep, earlier, args.prompt)
    basis = term_basis(loaded.model, protected, settings.rtol, args.prompt)
    print(f"SepCE '{args.prompt}': null space {basis.shape[1]} of {basis.shape[0]} dims, "
          f"protecting {len(protected)} prompts: {', '.join(repr(p) for p in protected)}")
    latents, settings.data = prepare_training_latents(loaded, args.prompt, args.data_dir, args.num_images)
    trainer = SepCETrainer(loaded.model, settings, latents, protected, basis, earlier, devices[0],
                           autocast_dtype(args.mixed_precision, devices[0]))
    image_size = pixel_size(loaded.model)
    run_dir = train_run(trainer, name, "sepce", args, config, settings.iterations, f"SepCE: {args.prompt}",
                        [args.prompt], image_size, {"prompt": args.prompt})
    stop = trainer.rule.stop_iteration
    print(f"erased {args.prompt} (SepCE, {'stopped by the rule at iteration ' + str(stop) if stop else 'iteration cap'}); "
          f"run written to {run_dir}")


if __name__ == "__main__":
    run(main)
