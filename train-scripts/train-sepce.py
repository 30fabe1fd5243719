"""Erase a concept with SepCE, Separable Concept Erasure (Zhao et al. 2024); tiny-sd by default.

    python train-scripts/train-sepce.py --prompt 'Van Gogh'                     # keeps the other styles
    python train-scripts/train-sepce.py --prompt Seurat --on sepce-word_VanGogh --run_name sepce-VanGogh-Seurat
    python train-scripts/restore-concept.py --model_name sepce-VanGogh-Seurat --concept 'Van Gogh' \\
        --run_name sepce-Seurat-restored

The concept's term edits every cross-attention to_k/to_v only outside the text embeddings of "" and the
keep set (--keep; tiny-sd's default: every other value of the concept's attribute), so those prompts'
predictions stay the base model's. The same as ``erase.py --method sepce``. Writes models/<run_name>/ with one term-<concept>.safetensors per
erased concept (with --on, the earlier run's terms, unchanged), config.yaml, loss.png, samples.png,
training.json (null-space dimension, stop iteration, seconds) and diffusers/ (terms folded in).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ldm beside this script, in whichever clone

from ldm.cli import run
from ldm.erasure.erase import main as erase_main


def main(argv=None):
    return erase_main(argv, method_name="sepce", description=__doc__)


if __name__ == "__main__":
    run(main)
