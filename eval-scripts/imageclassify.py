"""Classify a folder of generated images, as ESD's imageclassify.py, with the tiny-sd evaluator or
torchvision's ImageNet ResNet-50.

    python eval-scripts/imageclassify.py --folder_path outputs/images/tiny-sd \
        --prompts_path data/tiny-sd/quality.csv --save_path outputs/tiny-sd-classes.csv

With tiny-sd and a prompts CSV that has object/color/style columns, also prints and saves the
accuracy per attribute (to <save_path stem>_accuracy.csv). For every prompt with several images, it
prints how much they differ across seeds.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ldm beside this script, in whichever clone

import torch

from ldm.cli import new_parser, parse_device, run
from ldm.evaluation import (accuracy_by_attribute, classify_folder, correct_table, expected_samples, incomplete_images,
                            list_images, seed_diversity)
from ldm.evaluator import load_evaluator
from ldm.imagenet import classify_folder_imagenet
from ldm.paths import EVALUATOR_PATH
from ldm.prompts import read_prompts
from ldm.util import UsageError, atomic_to_csv, warn


def main(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("--folder_path", required=True)
    parser.add_argument("--prompts_path", default=None, help="the CSV the images were made from")
    parser.add_argument("--save_path", required=True, help="CSV of per-image predictions")
    parser.add_argument("--topk", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--classifier", choices=["tiny-sd", "resnet50"], default="tiny-sd")
    parser.add_argument("--evaluator_path", default=str(EVALUATOR_PATH))
    parser.add_argument("--allow_incomplete", action="store_true",
                        help="score what is there when images are missing or unreadable (default: refuse)")
    args = parser.parse_args(argv)
    prompts = read_prompts(args.prompts_path, skip_empty=True) if args.prompts_path else None
    device = parse_device(args.device)

    if args.classifier == "resnet50":
        results = classify_folder_imagenet(args.folder_path, device, args.batch_size, args.topk)
    else:
        results = classify_folder(load_evaluator(args.evaluator_path, device), args.folder_path, args.batch_size,
                                  args.topk)
    if prompts is not None:
        results = results.merge(prompts[["case_number", "prompt"]], on="case_number", how="left")
    save_path = Path(args.save_path)
    atomic_to_csv(results, save_path)
    unreadable = int(results["error"].notna().sum()) if "error" in results else 0
    print(f"{len(results)} images classified ({unreadable} unreadable); predictions in {save_path}")
    if prompts is not None:
        incomplete = incomplete_images(results, prompts, expected_samples(args.folder_path, results))
        if len(incomplete):
            listed = atomic_to_csv(incomplete, save_path.with_name(save_path.stem + "_incomplete.csv"))
            message = (f"{int(incomplete.missing.sum())} images missing and {int(incomplete.unreadable.sum())} "
                       f"unreadable in {len(incomplete)} prompts (cases {', '.join(map(str, incomplete.case_number[:8]))}"
                       f"{', ...' if len(incomplete) > 8 else ''}; listed in {listed})")
            if not args.allow_incomplete:
                raise UsageError(f"{message}: rerun generate-images.py (it redoes missing and torn images), or pass "
                                 "--allow_incomplete to score the rest")
            warn(f"{message}; scoring the rest (--allow_incomplete)")
    if args.classifier == "tiny-sd" and prompts is not None:
        named = correct_table(results, prompts)  # per attribute: images whose prompt names it, share correct
        if len(named):
            accuracy = accuracy_by_attribute(named)
            percent = "{:.1%}".format
            print(accuracy.to_string(index=False, formatters={"accuracy": percent, "ci95_low": percent,
                                                              "ci95_high": percent}))
            atomic_to_csv(accuracy, save_path.with_name(save_path.stem + "_accuracy.csv"))
    diversity = seed_diversity(args.folder_path, list_images(args.folder_path))
    if len(diversity):
        print(f"seeds: {diversity['all_distinct'].mean():.1%} of {len(diversity)} prompts have all their images "
              f"distinct; mean pairwise difference {diversity['mean_pair_difference'].mean():.1f}/255")


if __name__ == "__main__":
    run(main)
