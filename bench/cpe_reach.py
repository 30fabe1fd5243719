"""How far a CPE run's ResAG reaches its erase target, layer by layer.

    python bench/cpe_reach.py cpe31-moon cpe31-cross

For each run (one concept each) and each wrapped projection: ``||W~ c_tgt - target|| / ||W c_tgt - target||`` over
the run's training sentences, with ``target = W c_ntl + eta (W c_ntl - W c_tgt)`` (the erase loss's target). 0: the
edited projection is the target; 1: the ResAG did not move toward it. Reads the sentences, neutral, eta and rank
the run recorded; prints one line per run (min, median, max over layers, then every layer).

Beside it, the ``ceiling``: per layer, the least relative distance any residual of the run's rank that is a linear
function of each token's own embedding reaches (a reduced-rank regression of ``target - W c_tgt`` on ``c_tgt``, over
the tokens where target and neutral differ), its median over layers. It depends on the concept, the neutral and the
model alone, not on training or eta: a ResAG whose attention kept each token to itself could reach it at best (its
pooled input may do a little better or worse). A concept whose ceiling is high needs more than CPE's residual form
can give.
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
def encode_pair(model, concept, sentences, neutral):
    """The text embeddings of the sentences with the concept and with the neutral in their slot."""
    return tuple(model.get_learned_conditioning([fill(s, word) for s in sentences]).float()
                 for word in (concept, neutral))


@torch.no_grad()
def reach(model, resag, E_t, E_n, eta):
    """Per wrapped layer, the relative distance of the edited projection from the erase target."""
    gated, _ = resag.gate(E_t)
    distances = {}
    for name, layer in gated_projections(model.model.diffusion_model).items():
        W = layer.weight.float()
        base_t, base_n = F.linear(E_t, W), F.linear(E_n, W)
        target = base_n + eta * (base_n - base_t)
        distances[name] = float((base_t + resag.residual(gated, name) - target).norm() / (base_t - target).norm())
    return distances


@torch.no_grad()
def ceiling(model, E_t, E_n, rank):
    """Per wrapped layer, the relative distance left by the best rank-``rank`` linear map from each token's embedding
    to its erase target's change ``(1 + eta) W (c_ntl - c_tgt)`` (reduced-rank regression over the tokens the neutral
    changes; a relative distance, so ``eta`` drops out)."""
    change = E_n - E_t
    moved = change.norm(dim=-1) > 1e-4 * change.norm(dim=-1).max()
    X, change = E_t[moved], change[moved]
    distances = {}
    for name, layer in gated_projections(model.model.diffusion_model).items():
        Y = F.linear(change, layer.weight.float())
        fitted = X @ torch.linalg.lstsq(X, Y).solution
        top = torch.linalg.svd(fitted, full_matrices=False).Vh[:rank]
        distances[name] = float((Y - fitted @ top.T @ top).norm() / Y.norm())
    return distances


def median(values):
    return sorted(values)[len(values) // 2]


def main(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("runs", nargs="+", help="CPE runs (one concept each)")
    args = parser.parse_args(argv)
    for name in args.runs:
        folder = run_folder(name)
        config = read_run_config(folder)
        if config is None or "gate_rank" not in config.run:  # the settings every CPE run records
            raise UsageError(f"'{name}' is not a CPE run (it records no gate_rank)")
        settings = config.run
        resags = read_resags(folder)
        if len(resags) != 1 or "sentences" not in settings:
            raise UsageError(f"'{name}' holds {len(resags)} concepts or no recorded sentences; give a one-concept "
                             "run made by this version")
        model = load_model(name).model
        model.resag_hooks.remove()  # the base's projections; the ResAG is applied here by hand
        move_to(resags, "cpu")
        neutral = settings["neutrals"][0] if "neutrals" in settings else settings["neutral"]  # older runs: one
        E_t, E_n = encode_pair(model, resags[0].concept, settings["sentences"][0], neutral)
        distances = reach(model, resags[0], E_t, E_n, settings["eta"])
        best = ceiling(model, E_t, E_n, resags[0].rank)
        values = sorted(distances.values())
        print(f"{name}: min {values[0]:.2f}, median {median(values):.2f}, max {values[-1]:.2f}, "
              f"ceiling (median) {median(list(best.values())):.2f}; "
              + " ".join(f"{k.replace('.transformer_blocks.0.attn2', '')}={v:.2f}" for k, v in distances.items()))


if __name__ == "__main__":
    run(main)
