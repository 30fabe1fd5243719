"""CPE training: the loss in the text space (ours) vs every layer's outputs formed (the public code), in one process.

    python bench/cpe_step.py                              # tiny-sd, CPU
    python bench/cpe_step.py --size sd-v1 --device cuda   # random weights in SD v1 shapes (77 x 768, 32 projections)

Both variants train the same ResAG on the same draws: an erase iteration of a stage after the first (target,
its 16 adversarial embeddings and 16 mixed anchors plus the empty prompt), then its backward and AdamW step. The
baseline forms every wrapped ``to_k``/``to_v`` output of every prompt, layer by layer, as the authors' loop does;
ours computes the same loss as a quadratic form in width x width Gram matrices (``ProjectionGeometry``). Prints
the time per iteration, the peak memory, their ratios to the baseline (lower is better) and the largest relative
difference of the two losses. Variants are timed interleaved over --repeats rounds, so a machine's drift is shared.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ldm beside this script, in whichever clone

import time

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ldm.benchmark import peak_memory
from ldm.cli import new_parser, parse_device, run
from ldm.erasure.cpe import CPESettings, CPETrainer
from ldm.loading import load_model
from ldm.paths import REPO_ROOT
from ldm.util import instantiate_from_config


class PerLayerCPE(CPETrainer):
    """The public code's computation of the same loss: each layer's outputs formed for every prompt, kept only as
    the benchmark's baseline."""

    def loss(self):
        concept, stage, step = self.settings.position(self.iteration)
        self._set_stage(concept, stage, step)
        s, resag = self.settings, self.resags[concept]
        E_t, E_n = self.target_and_neutral(concept)
        deltas, anchors = self.deltas[concept], self.anchor_batch(concept)
        m = len(deltas)
        batch = torch.cat([E_t, E_t + deltas, E_n, anchors])
        gated, _ = resag.gate(batch)
        erase = attacked = anchored = 0
        for name, layer in self.layers.items():
            with torch.no_grad():
                original = F.linear(batch, layer.weight.float())
            edited = original + resag.residual(gated, name)
            target = original[1 + m:2 + m] + s.eta * (original[1 + m:2 + m] - original[:1])
            weight = self.lipschitz[name]
            erase = erase + weight * (edited[:1] - target).pow(2).mean()
            if m:
                attacked = attacked + weight * (edited[1:1 + m] - target).pow(2).mean()
            anchored = anchored + weight * (edited[2 + m:] - original[2 + m:]).pow(2).mean()
        return (erase + attacked + s.anchor_weight * anchored) / len(self.layers)


def build_model(size, device):
    if size == "tiny-sd":
        return load_model("tiny-sd", device=device).model
    config = OmegaConf.load(REPO_ROOT / "configs/stable-diffusion/v1-inference.yaml")
    torch.manual_seed(0)
    return instantiate_from_config(config.model).to(device).eval()  # random weights, SD v1 shapes


def trainer_in_a_later_stage(kind, model, settings, device):
    """A trainer at the start of stage 1, with random adversarial embeddings in place, its ResAG's ``B`` and
    ``v`` nonzero (a ResAG in training)."""
    trainer = kind(model, settings, [["a photo", "Seurat", "a dog"]], device, progress=False)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, tensor in trainer.resags[0].tensors.items():
            if key.startswith("B.") or key == "v":
                tensor.copy_(torch.randn(tensor.shape, generator=generator).to(device) * 0.1)
    trainer.deltas[0] = (torch.randn(settings.adv_embeddings, *trainer.empty.shape[1:], generator=generator) * 0.01
                         ).to(device)
    trainer.iteration = settings.stage_iterations(0)
    return trainer


def main(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("--size", choices=["tiny-sd", "sd-v1"], default="tiny-sd")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iterations", type=int, default=50, help="iterations per variant and round")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    args = parser.parse_args(argv)
    device = parse_device(args.device)
    model = build_model(args.size, device)
    settings = CPESettings(prompt="Van Gogh", neutral="", iterations=100_000, first_stage_factor=1,
                           prompt_templates="none").check()
    variants = {"per layer (public code)": PerLayerCPE, "text space (ours)": CPETrainer}
    trainers = {name: trainer_in_a_later_stage(kind, model, settings, device) for name, kind in variants.items()}
    losses = {name: t.loss().item() for name, t in trainers.items()}  # the same draws: both start from one seed
    difference = abs(losses["text space (ours)"] - losses["per layer (public code)"]) / losses["per layer (public code)"]
    memory = {name: peak_memory(lambda: [trainer_in_a_later_stage(kind, model, settings, device).step()
                                         for _ in range(2)], device, repeats=1) for name, kind in variants.items()}
    seconds = dict.fromkeys(variants, 0.0)
    for trainer in trainers.values():
        trainer.step()  # warm-up
    for _ in range(args.repeats):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            for _ in range(args.iterations):
                trainer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds[name] += time.perf_counter() - start
    baseline = "per layer (public code)"
    per_iteration = {name: s / (args.repeats * args.iterations) for name, s in seconds.items()}
    print(f"CPE erase iteration on {args.size} ({device.type}, {len(trainers[baseline].layers)} projections), "
          f"{args.repeats} interleaved rounds of {args.iterations}; relative difference of the two losses: "
          f"{difference:.1e}")
    print(f"  {'variant':26s} {'ms/iteration':>13s} {'peak MiB':>10s} {'time ratio':>11s} {'memory ratio':>13s}")
    for name in variants:
        print(f"  {name:26s} {per_iteration[name] * 1000:13.2f} {memory[name] / 2**20:10.1f} "
              f"{per_iteration[name] / per_iteration[baseline]:11.3f} {memory[name] / max(memory[baseline], 1):13.3f}")


if __name__ == "__main__":
    run(main)
