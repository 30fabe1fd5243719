"""How a model's text side looks to erasure methods, per tiny-sd concept.

    python eval-scripts/text-geometry.py                 # tiny-sd -> outputs/text-geometry/<model>.csv

For each concept: the text width; the null-space dimension of the stacked embeddings (every token) of
its protected set, the empty prompt and every other value of its attribute, at relative tolerance
--rtol (what SepCE erases in); and how consistently the concept moves the mean-pooled context between
its bare name and the composed caption templates (cosine; mean and minimum over templates), which is
what lets an erasure trained on the bare name reach composed prompts. Per-template cosines go to
<save_path stem>-templates.csv.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ldm beside this script, in whichever clone

import pandas as pd

from ldm.cli import new_parser, run
from ldm.data.prompt_sets import all_concepts
from ldm.loading import load_model
from ldm.paths import outputs_dir
from ldm.text_geometry import NULL_SPACE_RTOL, direction_consistency, text_side_report
from ldm.util import UsageError, atomic_to_csv


def main(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("--model_name", default="tiny-sd")
    parser.add_argument("--rtol", type=float, default=NULL_SPACE_RTOL)
    parser.add_argument("--save_path", help="CSV (default outputs/text-geometry/<model_name>.csv)")
    args = parser.parse_args(argv)
    loaded = load_model(args.model_name)
    if loaded.kind == "diffusers":
        raise UsageError("text-geometry reads CompVis models and run folders; convert a diffusers folder first")
    report = text_side_report(loaded.model, all_concepts(), args.rtol)
    report.insert(0, "model_sha256", loaded.sha256[:12])
    save_path = Path(args.save_path or outputs_dir() / "text-geometry" / f"{Path(args.model_name).name}.csv")
    atomic_to_csv(report, save_path)
    templates = pd.concat([direction_consistency(loaded.model, c) for c in all_concepts()], ignore_index=True)
    atomic_to_csv(templates, save_path.with_name(save_path.stem + "-templates.csv"))
    print(report.drop(columns="model_sha256").to_string(index=False, float_format="{:.2f}".format))
    print(f"model {loaded.name} (identity {loaded.sha256[:12]}); rtol {args.rtol:g}; saved {save_path}")


if __name__ == "__main__":
    run(main)
