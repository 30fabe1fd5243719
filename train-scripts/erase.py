"""Erase a concept with any registered method; tiny-sd by default.

    python train-scripts/erase.py --method esd-x --prompt 'Van Gogh'
    python train-scripts/erase.py --method sepce --prompt heart --show_settings
    python train-scripts/erase.py --method cpe --help                       # that method's flags alone

Writes models/<run_name>/: the edit (trained-params.safetensors or one term-<concept>.safetensors per
concept), config.yaml (every setting, the method and the base model's identity), loss.txt, loss.png,
samples.png (before/after), training.json, diffusers/ (unless --no_diffusers), model.ckpt (with
--save_compvis) and checkpoints/last.pt (resumable with --resume).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ldm beside this script, in whichever clone

from ldm.cli import run
from ldm.erasure.erase import main

if __name__ == "__main__":
    run(main, description=__doc__)
