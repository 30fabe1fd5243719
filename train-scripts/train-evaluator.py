"""Train the tiny-sd evaluator (object, color and style heads) on rendered images.

    python train-scripts/train-evaluator.py      # writes models/tiny-sd/evaluator.safetensors

Trained through the Lightning Trainer, seeded; a killed run continues from --work_dir, which refuses
to continue a run with other settings, another world or another autoencoder.

Half of each batch is shown as tiny-sd's autoencoder reconstructs it (the first stage of --model_name),
so the decoder's blur, which every generated image carries, is not judged; the autoencoder's SHA-256
is recorded in the evaluator's metadata, and the erasure report warns when a model's autoencoder is
another. --no_reconstructions trains on the renders alone. Run it after train-tiny-sd.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ldm beside this script, in whichever clone

from ldm.cli import new_parser, run
from ldm.evaluator import heldout_accuracy, save_evaluator, train_evaluator
from ldm.loading import load_model
from ldm.paths import EVALUATOR_PATH, outputs_dir


def main(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("--out", default=str(EVALUATOR_PATH))
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model_name", default="tiny-sd", help="the model whose autoencoder reconstructs")
    parser.add_argument("--no_reconstructions", action="store_true")
    parser.add_argument("--work_dir", default=str(outputs_dir() / "train-evaluator"))
    args = parser.parse_args(argv)
    first_stage = None
    if not args.no_reconstructions:
        first_stage = load_model(args.model_name).model.first_stage_model
    model = train_evaluator(args.work_dir, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            first_stage=first_stage)
    print(f"saved {save_evaluator(model, args.out, first_stage)}")
    views = {"fresh images": None}
    if first_stage is not None:
        views["their reconstructions"] = first_stage
    for name, stage in views.items():
        accuracy = heldout_accuracy(model, count=1000, first_stage=stage)
        print(f"held-out accuracy on 1000 {name}: " + ", ".join(f"{k} {v:.1%}" for k, v in accuracy.items()))


if __name__ == "__main__":
    run(main)
