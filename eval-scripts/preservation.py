"""How exactly an edited model keeps prompts it should not touch: cross-attention keys/values and images.

    python eval-scripts/preservation.py --model_name sepce-word_VanGogh          # "" and the run's protected set
    python eval-scripts/preservation.py --model_name sepce-Seurat --prompts 'Van Gogh' --base_model tiny-sd

Per prompt: the largest absolute difference of any attn2 to_k/to_v output (fp32, every token) and the
largest pixel difference (0-255) between the base's and the edited model's images from the same start
noise (--num_seeds images each). SepCE's promise: 0 up to float rounding, images identical up to 1/255.
Writes --save_path/<run>/<key>.csv, the key a digest of both models' identities and every setting above, so a
run with another base, prompts or sampling never replaces an earlier one; the CSV names both identities.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ldm beside this script, in whichever clone

import torch

from ldm.cli import new_parser, parse_device, run
from ldm.erasure.report import preservation_table
from ldm.erasure.sepce import read_terms
from ldm.loading import load_model
from ldm.paths import outputs_dir
from ldm.runs import find_run
from ldm.util import UsageError, atomic_to_csv, json_sha256


def main(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("--model_name", required=True, help="the edited model: a run folder under models/")
    parser.add_argument("--base_model", default="tiny-sd")
    parser.add_argument("--prompts", help="comma-separated prompts (default: \"\" and every term's protected set)")
    parser.add_argument("--num_seeds", type=int, default=4)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--ddim_steps", type=int, default=50)
    parser.add_argument("--save_path", default=str(outputs_dir() / "preservation"))
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    folder = find_run(args.model_name, "--model_name")
    if args.prompts is not None:
        prompts = [p.strip() for p in args.prompts.split(",")]
    else:
        prompts = list(dict.fromkeys(p for term in read_terms(folder) for p in term["protected"]))
        if not prompts:
            raise UsageError(f"run '{args.model_name}' has no separable terms to read a protected set from; "
                             "name the prompts with --prompts")
    device = parse_device(args.device)
    base, edited = load_model(args.base_model, device=device), load_model(str(folder), device=device)
    table = preservation_table(base.model, edited.model, prompts, range(args.num_seeds), args.guidance_scale,
                               args.ddim_steps)
    key = json_sha256({"base": base.sha256, "edited": edited.sha256, "prompts": prompts, "seeds": args.num_seeds,
                       "guidance_scale": args.guidance_scale, "ddim_steps": args.ddim_steps})[:12]
    out = Path(args.save_path) / folder.name / f"{key}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_to_csv(table.assign(base_sha256=base.sha256[:12], edited_sha256=edited.sha256[:12]), out)
    print(f"base {base.name} ({base.sha256[:12]}), edited {edited.name} ({edited.sha256[:12]}); "
          f"{args.num_seeds} images per prompt")
    print(table.to_string(index=False))
    print(f"written to {out}")


if __name__ == "__main__":
    run(main)
