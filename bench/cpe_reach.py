"""How far a CPE run's ResAG reaches its erase target, layer by layer.

    python bench/cpe_reach.py cpe31-moon cpe31-cross

For each run (one concept each) and each wrapped projection: ``||W~ c_tgt - target|| / ||W c_tgt - target||`` over
the run's training sentences, with ``target = W c_ntl + eta (W c_ntl - W c_tgt)`` (the erase loss's target). 0: the
edited projection is the target; 1: the ResAG did not move toward it. Reads the sentences, neutral and eta the run
recorded; prints one line per run (min, median, max over layers, then every layer).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ldm beside this script, in whichever clone

import torch
import torch.nn.functional as F

from ldm.cli import new_parser, run
from ldm.erasure.cpe_gates import gated_projections, move_to, read_resags
from ldm.erasure.cpe_prompts import fill
from ldm.loading import load_model
from ldm.runs import read_run_config, run_folder
from ldm.util import UsageError


@torch.no_grad()
def reach(model, resag, sentences, neutral, eta):
    """Per wrapped layer, the relative distance of the edited projection from the erase target."""
    E_t = model.get_learned_conditioning([fill(s, resag.concept) for s in sentences]).float()
    E_n = model.get_learned_conditioning([fill(s, neutral) for s in sentences]).float()
    gated, _ = resag.gate(E_t)
    distances = {}
    for name, layer in gated_projections(model.model.diffusion_model).items():
        W = layer.weight.float()
        base_t, base_n = F.linear(E_t, W), F.linear(E_n, W)
        target = base_n + eta * (base_n - base_t)
        distances[name] = float((base_t + resag.residual(gated, name) - target).norm() / (base_t - target).norm())
    return distances


def main(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("runs", nargs="+", help="CPE runs (one concept each)")
    args = parser.parse_args(argv)
    for name in args.runs:
        folder = run_folder(name)
        settings = read_run_config(folder).run
        if "gate_rank" not in settings:  # the settings every CPE run records
            raise UsageError(f"'{name}' is not a CPE run (it records no gate_rank)")
        resags = read_resags(folder)
        if len(resags) != 1 or "sentences" not in settings:
            raise UsageError(f"'{name}' holds {len(resags)} concepts or no recorded sentences; give a one-concept "
                             "run made by this version")
        model = load_model(name).model
        model.resag_hooks.remove()  # the base's projections; the ResAG is applied here by hand
        move_to(resags, "cpu")
        distances = reach(model, resags[0], settings["sentences"][0], settings["neutral"], settings["eta"])
        values = sorted(distances.values())
        print(f"{name}: min {values[0]:.2f}, median {values[len(values) // 2]:.2f}, max {values[-1]:.2f}; "
              + " ".join(f"{k.replace('.transformer_blocks.0.attn2', '')}={v:.2f}" for k, v in distances.items()))


if __name__ == "__main__":
    run(main)
