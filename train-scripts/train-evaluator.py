"""Train the tiny-sd evaluator (object, color and style heads) on rendered images.

    python train-scripts/train-evaluator.py      # writes models/tiny-sd/evaluator.safetensors

Half of each batch is shown as tiny-sd's autoencoder reconstructs it (its first stage, read from
--ckpt_path/--config_path), so the decoder's blur, which every generated image carries, is not
judged; --no_reconstructions trains on the renders alone. Run it after train-tiny-sd.py.
"""
from ldm.cli import new_parser, run
from ldm.evaluator import heldout_accuracy, save_evaluator, train_evaluator
from ldm.paths import MODELS_DIR
from ldm.util import load_model_from_config


def main():
    parser = new_parser(__doc__)
    parser.add_argument("--out", default=str(MODELS_DIR / "tiny-sd" / "evaluator.safetensors"))
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ckpt_path", default=str(MODELS_DIR / "tiny-sd" / "model.ckpt"))
    parser.add_argument("--config_path", default=str(MODELS_DIR / "tiny-sd" / "config.yaml"))
    parser.add_argument("--no_reconstructions", action="store_true")
    args = parser.parse_args()
    first_stage = None
    if not args.no_reconstructions:
        first_stage = load_model_from_config(args.config_path, args.ckpt_path).first_stage_model
    model = train_evaluator(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            first_stage=first_stage)
    print(f"saved {save_evaluator(model, args.out)}")
    views = {"fresh images": None}
    if first_stage is not None:
        views["their reconstructions"] = first_stage
    for name, stage in views.items():
        accuracy = heldout_accuracy(model, count=1000, first_stage=stage)
        print(f"held-out accuracy on 1000 {name}: " + ", ".join(f"{k} {v:.1%}" for k, v in accuracy.items()))


if __name__ == "__main__":
    run(main)
