"""Frechet distance between two folders of images: FID with Inception features, or, for tiny-sd, the
same distance in the tiny-sd evaluator's feature space.

    python eval-scripts/fid.py --real_folder coco-30k-images --fake_folder outputs/images/esd-u       # FID
    python eval-scripts/fid.py --features tiny-sd --real_folder outputs/images/tiny-sd \
        --fake_folder outputs/images/<run>                                                          # tiny-sd drift

Every image file in each folder counts, whatever its name (a COCO reference folder keeps COCO's names).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ldm beside this script, in whichever clone

import json

import torch

from ldm.cli import new_parser, parse_device, run
from ldm.evaluator import load_evaluator
from ldm.metrics import INCEPTION_WEIGHTS, evaluator_fid, frechet_distance, inception_fid_metric
from ldm.paths import EVALUATOR_PATH
from ldm.util import atomic_write_text


def main(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("--real_folder", required=True, help="the reference images (e.g. COCO, or the base model's)")
    parser.add_argument("--fake_folder", required=True, help="the images to score")
    parser.add_argument("--features", choices=["inception", "tiny-sd"], default="inception")
    parser.add_argument("--inception_weights", default=str(INCEPTION_WEIGHTS))
    parser.add_argument("--evaluator_path", default=str(EVALUATOR_PATH))
    parser.add_argument("--image_size", type=int, default=299,
                        help="Inception: every image is resized (PIL bicubic) to this square first")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--save_path", default=None, help="JSON with the distance and what it was computed on")
    args = parser.parse_args(argv)
    device = parse_device(args.device)
    if args.features == "tiny-sd":
        distance, real, fake = evaluator_fid(load_evaluator(args.evaluator_path, device), Path(args.real_folder),
                                             Path(args.fake_folder), args.batch_size)
    else:
        distance, real, fake = frechet_distance(inception_fid_metric(args.inception_weights), Path(args.real_folder),
                                                Path(args.fake_folder), args.batch_size, args.image_size, device)
    print(f"FID ({args.features} features) {distance:.3f}: {real} reference images in {args.real_folder}, "
          f"{fake} in {args.fake_folder}")
    if args.save_path:
        record = {"fid": distance, "features": args.features, "real_folder": args.real_folder,
                  "fake_folder": args.fake_folder, "real_images": real, "fake_images": fake}
        atomic_write_text(args.save_path, json.dumps(record, indent=2))


if __name__ == "__main__":
    run(main)
