"""Draw tiny-sd's concept grid (rows objects, columns styles) with a model, as one PNG.

    python eval-scripts/sample-grid.py                  # tiny-sd -> outputs/tiny-sd-grid.png
    python eval-scripts/sample-grid.py --model_name <run_name> --out outputs/<run_name>-grid.png
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ldm beside this script, in whichever clone

import torch

from ldm.cli import new_parser, parse_device, run
from ldm.generate import concept_grid
from ldm.loading import load_model
from ldm.paths import outputs_dir
from ldm.plots import save_image_grid
from ldm.util import UsageError


def main(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("--model_name", default="tiny-sd")
    parser.add_argument("--out", default=None, help="PNG path (default outputs/<model_name>-grid.png)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--ddim_steps", type=int, default=50)
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--force_base", action="store_true",
                        help="load a run whose base checkpoint differs from the one it was trained on")
    args = parser.parse_args(argv)
    loaded = load_model(args.model_name, device=parse_device(args.device), force_base=args.force_base)
    if loaded.kind == "diffusers":
        raise UsageError(f"'{args.model_name}' is a diffusers folder; the grid draws CompVis models and run folders")
    images, rows, cols = concept_grid(loaded.model, seed=args.seed, guidance_scale=args.guidance_scale,
                                      ddim_steps=args.ddim_steps)
    out = args.out or outputs_dir() / f"{Path(args.model_name).name}-grid.png"
    save_image_grid(images, out, row_labels=rows, col_labels=cols,
                    title=f"{args.model_name} ({loaded.sha256[:12]}): objects x styles")
    print(f"saved {out} (model identity {loaded.sha256[:12]})")


if __name__ == "__main__":
    run(main)
