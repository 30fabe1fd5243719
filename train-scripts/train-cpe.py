"""Erase concepts with CPE, Concept Pinpoint Eraser (Lee et al. 2025): Residual Attention Gates on every
cross-attention to_k/to_v, trained on text embeddings only (no UNet); tiny-sd by default.

    python train-scripts/train-cpe.py --prompt 'Van Gogh'
    python train-scripts/train-cpe.py --prompt 'Van Gogh,moon' --seperator ',' --run_name cpe-two
    python train-scripts/restore-concept.py --model_name cpe-two --concept moon --run_name cpe-VanGogh

Anchors (concepts kept): --anchors 'a,b' exactly, or generic words (--anchor_words) plus the --nearest_anchors
entries of --anchor_vocab closest to the target (tiny-sd: its other concepts). --stages 1 is CPE without
adversarial stages. Writes models/<run_name>/ with one term-<concept>.safetensors (the concept's ResAG) per
concept, config.yaml, loss.png, samples.png, training.json and diffusers/ (the base's weights: a ResAG
cannot fold into static weights; ldm.erasure.cpe.apply_to_diffusers applies the run to a pipeline).
"""
from ldm.cli import add_model_args, new_parser, run
from ldm.erasure.cie import fill_defaults, templates_of
from ldm.erasure.cpe import (CPE_ORIGINAL_DEFAULTS, DEFAULT_ANCHOR_WORDS, CPESettings, CPETrainer, choose_anchors,
                             read_words)
from ldm.erasure.esd import DEFAULT_PROMPT_TEMPLATES, concept_words
from ldm.erasure.runs import add_run_args, load_base, parse_devices, prepare_run_dir, train_run
from ldm.generate import pixel_size
from ldm.util import UsageError, load_config


def main():
    parser = add_run_args(add_model_args(new_parser(__doc__)))
    parser.add_argument("--prompt", required=True, help="the concept(s) to erase, e.g. 'Van Gogh'")
    parser.add_argument("--seperator", "--separator", dest="seperator", help="split --prompt on this (one ResAG each)")
    parser.add_argument("--anchors", help="comma-separated anchors to keep, instead of the generic words and nearest "
                                          "vocabulary entries")
    parser.add_argument("--anchor_words", default=str(DEFAULT_ANCHOR_WORDS), help="generic anchors, one a line")
    parser.add_argument("--anchor_vocab", help="file of concepts to pick the nearest anchors from (default for tiny-sd: "
                                               "its other concepts)")
    parser.add_argument("--nearest_anchors", type=int, default=50, help="vocabulary entries nearest the target kept")
    parser.add_argument("--neutral", help="the surrogate the target maps to in each template (default 'real "
                                          "photograph', or the model config's cpe_defaults)")
    parser.add_argument("--prompt_templates", default=str(DEFAULT_PROMPT_TEMPLATES), metavar="FILE",
                        help="phrasings target, neutral and anchors are filled into, one a line with {}")
    for flag, kind, text in [("eta", float, "eta of the erase target W c_ntl + eta (W c_ntl - W c_tgt)"),
                             ("anchor_weight", float, "lambda_anc"), ("anchor_batch", int, "mixed anchors per step"),
                             ("rank", int, "rank of A_l B_l (1 styles/names, 4 explicit content)"),
                             ("gate_rank", int, "rank of U1, U2 (16 styles/names, 64 explicit content)"),
                             ("alpha", float, "the residual's scale is alpha / rank"),
                             ("stages", int, "erase stages, an adversarial stage between each two (1: none)"),
                             ("iterations", int, "erase iterations per stage after the first"),
                             ("first_stage_factor", int, "the first stage runs this many times --iterations"),
                             ("lr", float, "AdamW's lr after the first stage"),
                             ("first_stage_lr_factor", float, "the first stage's lr is this times --lr"),
                             ("adv_embeddings", int, "adversarial embeddings learned per adversarial stage"),
                             ("adv_lr", float, "their AdamW lr")]:
        parser.add_argument(f"--{flag}", type=kind, help=f"{text} (default: the model config's cpe_defaults, "
                                                         "else the public code's)")
    parser.add_argument("--run_name", help="default: cpe-word_<prompt>")
    args = parser.parse_args()

    words = concept_words(args.prompt, args.seperator)
    config = load_config(args.config_path)
    fill_defaults(args, config.get("cpe_defaults", {}), CPE_ORIGINAL_DEFAULTS)
    devices = parse_devices(args.devices)
    if len(devices) > 1:
        raise UsageError("CPE trains on one device (it never runs the UNet); give one --devices entry")
    name = args.run_name or "cpe-word_" + "_".join(w.replace(" ", "") for w in words)
    templates = templates_of(args.prompt_templates) or ["{}"]
    listed = [a for a in args.anchors.split(",")] if args.anchors is not None else None
    CPESettings(concepts=words, anchors=[listed or [] for _ in words], rank=args.rank, gate_rank=args.gate_rank,
                templates=templates).check()  # refuse bad input before loading the model
    prepare_run_dir(name, resume=args.resume, overwrite=args.overwrite, check_only=True)

    model = load_base(args, devices[0]).model
    generic = read_words(args.anchor_words) if args.anchor_words else []
    vocabulary = read_words(args.anchor_vocab) if args.anchor_vocab else None
    anchors = [choose_anchors(model, w, listed, generic, vocabulary, args.nearest_anchors) for w in words]
    settings = CPESettings(concepts=words, anchors=anchors, neutral=args.neutral, templates=templates, eta=args.eta,
                           anchor_weight=args.anchor_weight, anchor_batch=args.anchor_batch, rank=args.rank,
                           gate_rank=args.gate_rank, alpha=args.alpha, stages=args.stages, iterations=args.iterations,
                           first_stage_factor=args.first_stage_factor, lr=args.lr,
                           first_stage_lr_factor=args.first_stage_lr_factor, adv_embeddings=args.adv_embeddings,
                           adv_lr=args.adv_lr, seed=args.seed)
    for word, kept in zip(words, anchors):
        print(f"CPE '{word}': {len(kept)} anchors ({', '.join(kept[:8])}{', ...' if len(kept) > 8 else ''})")
    trainer = CPETrainer(model, settings, devices[0])
    run_dir = train_run(trainer, name, "cpe", args, config, settings.total_iterations(), f"CPE: {args.prompt}",
                        words, pixel_size(model), {"prompt": args.prompt})
    print(f"erased {', '.join(words)} (CPE, {settings.stages} stages); run written to {run_dir}")


if __name__ == "__main__":
    run(main)
