"""Restore an erased concept: a new run without that concept's separable term (SepCE, and CPE's ResAGs).

    python train-scripts/restore-concept.py --model_name sepce-VanGogh-Seurat --concept 'Van Gogh' \\
        --run_name sepce-Seurat

The new run keeps every other term of --model_name unchanged; dropping every term gives the base
model's weights exactly.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ldm beside this script, in whichever clone

from ldm.cli import new_parser, run
from ldm.erasure import methods
from ldm.runs import find_run, restore_concept


def main(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("--model_name", required=True, help="the run to restore a concept of")
    parser.add_argument("--concept", required=True, help="the erased concept to bring back")
    parser.add_argument("--run_name", required=True, help="the new run")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    args = parser.parse_args(argv)

    restorable = [m.name for m in methods.REGISTRY if m.restorable]
    source = find_run(args.model_name, "--model_name", lambda config: methods.method_of_run(config).restorable,
                      f"a run whose concepts are separate terms ({', '.join(restorable)})")
    new_dir = restore_concept(source, args.concept, args.run_name, overwrite=args.overwrite)
    print(f"restored '{args.concept}': run {new_dir} holds {args.model_name} without its term")


if __name__ == "__main__":
    run(main)
