"""Train the tiny-sd evaluator (object, color and style heads) on rendered images.

    python train-scripts/train-evaluator.py      # writes models/tiny-sd/evaluator.safetensors
"""
from ldm.cli import new_parser, run
from ldm.evaluator import heldout_accuracy, save_evaluator, train_evaluator
from ldm.paths import MODELS_DIR


def main():
    parser = new_parser(__doc__)
    parser.add_argument("--out", default=str(MODELS_DIR / "tiny-sd" / "evaluator.safetensors"))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = train_evaluator(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    print(f"saved {save_evaluator(model, args.out)}")
    accuracy = heldout_accuracy(model, count=1000)
    print("held-out accuracy on 1000 fresh images: " + ", ".join(f"{k} {v:.1%}" for k, v in accuracy.items()))


if __name__ == "__main__":
    run(main)
