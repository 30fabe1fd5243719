"""Erase a concept with CiE, Concept-irrelevant Erasure (Zhao et al. 2024); tiny-sd by default.

    python train-scripts/train-cie.py --prompt 'Van Gogh'
    python train-scripts/train-cie.py --prompt 'Van Gogh' --data_dir data/train/Van_Gogh \\
        --config_path configs/stable-diffusion/v1-inference.yaml --ckpt_path sd-v1-4-full-ema.ckpt --devices 0

Training images of the concept come from --data_dir (eval-scripts/generate-data.py) or, without it, are
drawn by the base model once and cached by its identity. The same as ``erase.py --method cie``. Writes models/<run_name>/ as train-esd.py does
(trained-params.safetensors with the attn2 weights, config.yaml, loss.png, samples.png, diffusers/)
plus training.json (iterations run, the stop rule's iteration, seconds).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ldm beside this script, in whichever clone

from ldm.cli import run
from ldm.erasure.erase import main as erase_main


def main(argv=None):
    return erase_main(argv, method_name="cie", description=__doc__)


if __name__ == "__main__":
    run(main)
