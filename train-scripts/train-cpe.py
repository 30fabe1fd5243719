"""Erase concepts with CPE, Concept Pinpoint Eraser (Lee et al. 2025): Residual Attention Gates on every
cross-attention to_k/to_v, trained on text embeddings only (no UNet); tiny-sd by default.

    python train-scripts/train-cpe.py --prompt 'Van Gogh'
    python train-scripts/train-cpe.py --prompt 'Van Gogh,moon' --seperator ',' --run_name cpe-two
    python train-scripts/restore-concept.py --model_name cpe-two --concept moon --run_name cpe-VanGogh

Anchors (concepts kept): --anchors 'a,b' exactly, or generic words (--anchor_words) plus the --nearest_anchors
entries of --anchor_vocab closest to the target (tiny-sd: its other concepts). --stages 1 is CPE without
adversarial stages. The same as ``erase.py --method cpe``. Writes models/<run_name>/ with one
term-<concept>.safetensors (the concept's ResAG) per
concept, config.yaml, loss.png, samples.png, training.json and diffusers/ (the base's weights: a ResAG
cannot fold into static weights; the registry entry's apply_to_diffusers wraps a pipeline with the run).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ldm beside this script, in whichever clone

from ldm.cli import run
from ldm.erasure.erase import main as erase_main


def main(argv=None):
    return erase_main(argv, method_name="cpe", description=__doc__)


if __name__ == "__main__":
    run(main)
