"""Erase a concept with ESD (Gandikota et al. 2023), with the original CompVis script's flags; tiny-sd by default.

    python train-scripts/train-esd.py --prompt 'Van Gogh' --train_method xattn
    python train-scripts/train-esd.py --prompt nudity --train_method noxattn \\
        --config_path configs/stable-diffusion/v1-inference.yaml --ckpt_path sd-v1-4-full-ema.ckpt --devices 0

The same as ``erase.py --method esd-x`` (``--train_method`` picks the variant: noxattn is esd-u). Writes
models/<run_name>/: trained-params.safetensors (the trained parameters alone), config.yaml (every setting and
the base model's identity), loss.txt, loss.png, samples.png (before/after), training.json, diffusers/ (unless
--no_diffusers), model.ckpt (with --save_compvis) and checkpoints/last.pt (resumable with --resume).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ldm beside this script, in whichever clone

from ldm.cli import run
from ldm.erasure import methods
from ldm.erasure.erase import erase, method_parser, parse_method_args


def main(argv=None):
    default = methods.esd_variant("xattn")
    args = parse_method_args(method_parser(default, __doc__, variant_flag=True), default, argv)
    return erase(methods.esd_variant(args.train_method), args)


if __name__ == "__main__":
    run(main)
