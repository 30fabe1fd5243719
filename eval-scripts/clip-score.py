"""CLIP score (0-100: 100 x cosine similarity, floored at 0) between generated images and their prompts.

    python eval-scripts/clip-score.py --folder outputs/images/esd-u --prompts_path coco_30k.csv

Uses torchmetrics' CLIPScore with a CLIP model from a local folder (default models/clip-score/: a
snapshot of openai/clip-vit-large-patch14, the model the literature reports with).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ldm beside this script, in whichever clone

import json

import torch

from ldm.cli import new_parser, parse_device, run
from ldm.metrics import CLIP_SCORE_MODEL, clip_score
from ldm.prompts import read_prompts
from ldm.util import atomic_write_text


def main(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("--folder", required=True, help="images named <case_number>_<i>.png")
    parser.add_argument("--prompts_path", required=True, help="the CSV the images were made from")
    parser.add_argument("--clip_model", default=str(CLIP_SCORE_MODEL))
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--save_path", default=None, help="JSON with the score and what it was computed on")
    args = parser.parse_args(argv)
    prompts = read_prompts(args.prompts_path, skip_empty=True)
    score = clip_score(args.folder, dict(zip(prompts["case_number"], prompts["prompt"])), args.clip_model,
                       args.batch_size, parse_device(args.device))
    print(f"CLIP score {score:.2f} (0-100 scale, {args.clip_model}) over {args.folder}")
    if args.save_path:
        atomic_write_text(args.save_path, json.dumps({"clip_score": score, "clip_model": args.clip_model,
                                                      "folder": args.folder}))


if __name__ == "__main__":
    run(main)
