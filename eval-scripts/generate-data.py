"""Draw training images of a concept with the model itself, for CiE and SepCE (the SepCE README's step).

    python eval-scripts/generate-data.py --prompt 'Van Gogh' --num_samples 64 --save_path data/train

Writes {save_path}/{prompt}/0_<i>.png, prompts.csv and generation.json (the model's identity and the
sampling settings; a folder made by another model or setting is refused, --overwrite replaces it).
train-cie.py and train-sepce.py make these images themselves when no --data_dir is given.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ldm beside this script, in whichever clone

import re

import torch

from ldm.cli import new_parser, parse_device, run
from ldm.erasure.concept_data import generate_concept_images
from ldm.text2image import load_generator


def main(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("--model_name", default="tiny-sd", help="folder under models/ (a base model or a run)")
    parser.add_argument("--prompt", required=True, help="the concept to draw, e.g. 'Van Gogh'")
    parser.add_argument("--save_path", default="data/train")
    parser.add_argument("--num_samples", type=int, default=64)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--ddim_steps", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--overwrite", action="store_true", help="replace a folder made otherwise")
    args = parser.parse_args(argv)

    from ldm.util import UsageError
    if not args.prompt.strip() or args.num_samples < 1:
        raise UsageError("--prompt must name a concept and --num_samples be >= 1")
    generator = load_generator(parse_device(args.device), model_name=args.model_name)
    out_dir = Path(args.save_path) / re.sub(r"[^A-Za-z0-9]+", "_", args.prompt).strip("_")
    generate_concept_images(generator, args.prompt, args.num_samples, out_dir, args.guidance_scale, args.ddim_steps,
                            args.batch_size, args.seed, args.overwrite)
    print(f"{args.num_samples} images of '{args.prompt}' in {out_dir}")


if __name__ == "__main__":
    run(main)
