"""ESD training: the project's trainer vs the original algorithm, in one process.

    python bench/esd_step.py                                 # tiny-sd, CPU, ESD-x
    python bench/esd_step.py --train_method noxattn
    python bench/esd_step.py --size sd-v1 --device cuda      # random weights in SD v1 shapes, 512 px

The naive baseline is the original script's algorithm: two full models (the frozen copy included),
text re-encoded every iteration, the teacher's two predictions as two forwards, x_t sampled by the
model being trained. Prints time per training iteration, time per training target, peak memory,
and the ratios to the baseline (lower is better). Variants are timed interleaved: each has its own
copy of the model, and --repeats rounds each time a block of --iterations targets of every variant
in turn, so that a machine's drift is shared. Reuse is timed over whole trajectories: its warm-up
uses up one trajectory and every block is a whole number of them.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ldm beside this script, in whichever clone

import copy
import time

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ldm.benchmark import peak_memory
from ldm.cli import new_parser, parse_device, run
from ldm.erasure.esd import ESDSettings, ESDTrainer, ddpm_timestep_interval, select_parameters, steps_to_reach
from ldm.generate import latent_shape, pixel_size
from ldm.loading import load_model
from ldm.models.diffusion.ddim import ddim_sample
from ldm.paths import REPO_ROOT
from ldm.util import instantiate_from_config


class NaiveESD:
    """The original CompVis script's training iteration, step for step (its x_t count, two full models, the text
    re-encoded each iteration), kept only as the benchmark's baseline."""

    def __init__(self, model, settings):
        self.model, self.settings = model, settings
        self.model_orig = copy.deepcopy(model).requires_grad_(False)  # the second full model
        unet = model.model.diffusion_model.requires_grad_(False)
        params = dict(unet.named_parameters())
        trained = [params[n].requires_grad_(True) for n in select_parameters(unet, settings.train_method)]
        self.optimizer = torch.optim.Adam(trained, lr=settings.lr)
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.shape = latent_shape(model, settings.image_size)
        self.iteration = 0

    def step(self):
        s, g = self.settings, self.generator
        words = s.concepts()
        word = words[int(torch.randint(len(words), (1,), generator=g))]
        emb_0 = self.model_orig.get_learned_conditioning([""])
        emb_p = self.model_orig.get_learned_conditioning([word])
        emb_n = self.model.get_learned_conditioning([word])
        x_T = torch.randn((1, *self.shape), generator=g).to(emb_0.device)
        t_enc = int(torch.randint(s.ddim_steps, (1,), generator=g))
        lo, hi = ddpm_timestep_interval(t_enc, s.ddim_steps)
        t = torch.randint(lo, hi, (1,), generator=g).to(emb_0.device)
        with torch.no_grad():
            z, _ = ddim_sample(self.model, x_T, emb_p, self.model.get_learned_conditioning([""]), s.start_guidance,
                               num_steps=s.ddim_steps, till_T=steps_to_reach(t_enc, s.ddim_steps, "authors"))
            e_0 = self.model_orig.apply_model(z, t, emb_0)
            e_p = self.model_orig.apply_model(z, t, emb_p)
        self.optimizer.zero_grad()
        loss = F.mse_loss(self.model.apply_model(z, t, emb_n), e_0 - s.negative_guidance * (e_p - e_0))
        loss.backward()
        self.optimizer.step()
        self.iteration += 1
        return loss.item()


def build_model(args, device):
    if args.size == "tiny-sd":
        return load_model("tiny-sd", device=device).model
    config = OmegaConf.load(REPO_ROOT / "configs/stable-diffusion/v1-inference.yaml")
    torch.manual_seed(0)
    return instantiate_from_config(config.model).to(device).eval()  # random weights, SD v1 shapes


def main(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("--size", choices=["tiny-sd", "sd-v1"], default="tiny-sd")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--train_method", default="xattn")
    parser.add_argument("--iterations", type=int, default=20,
                        help="training targets per variant and round (rounded up to whole trajectories)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--targets_per_trajectory", type=int, default=20)
    parser.add_argument("--ddim_steps", type=int, default=50)
    args = parser.parse_args(argv)
    device = parse_device(args.device)
    base = build_model(args, device)
    image_size = pixel_size(base)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model_bytes = sum(v.numel() * v.element_size() for v in state.values())  # the one model both start from
    prompt = "circle" if args.size == "tiny-sd" else "Van Gogh"

    def settings(**kw):
        return ESDSettings(prompt=prompt, train_method=args.train_method, lr=1e-5, ddim_steps=args.ddim_steps,
                           image_size=image_size, iterations=args.iterations, **kw)

    variants = {
        "naive (original)": lambda m: NaiveESD(m, settings()),
        "ours": lambda m: ESDTrainer(m, settings(), device),
        "ours, sample_from base": lambda m: ESDTrainer(m, settings(sample_from="base"), device),
        f"ours, reuse x{args.targets_per_trajectory}": lambda m: ESDTrainer(
            m, settings(sample_from="base", targets_per_trajectory=args.targets_per_trajectory), device),
    }

    def fresh_model():
        base.load_state_dict(state)
        return base

    memory = {}
    for name, make in variants.items():
        def train_two():
            trainer = make(fresh_model())
            trainer.step()
            trainer.step()
        memory[name] = model_bytes + peak_memory(train_two, device, repeats=1)

    trainers, seconds, targets = {}, {}, {}
    for name, make in variants.items():
        trainer = make(copy.deepcopy(fresh_model()))
        per_trajectory = getattr(trainer.settings, "targets_per_trajectory", 1)
        for _ in range(per_trajectory):  # warm-up: one whole trajectory
            trainer.step()
        trainers[name], seconds[name], targets[name] = (trainer, per_trajectory), 0.0, 0
    for _ in range(args.repeats):
        for name, (trainer, per_trajectory) in trainers.items():
            block = -(-args.iterations // per_trajectory) * per_trajectory
            start = time.perf_counter()
            for _ in range(block):
                trainer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds[name] += time.perf_counter() - start
            targets[name] += block
    results = {}
    for name, (trainer, per_trajectory) in trainers.items():
        per_target = seconds[name] / targets[name]
        results[name] = (per_target * per_trajectory, per_target, memory[name])

    _, naive_time, naive_memory = results["naive (original)"]
    print(f"ESD {args.train_method} on {args.size} ({device.type}), {args.ddim_steps} DDIM steps, "
          f"{args.repeats} interleaved rounds of {args.iterations} training targets each (whole trajectories); "
          "an iteration is one sampling trajectory")
    print(f"  {'variant':28s} {'s/iteration':>12s} {'s/target':>10s} {'peak MiB':>10s} {'time ratio':>11s} "
          f"{'memory ratio':>13s}")
    for name, (per_iteration, seconds, memory) in results.items():
        print(f"  {name:28s} {per_iteration:12.3f} {seconds:10.3f} {memory / 2**20:10.1f} "
              f"{seconds / naive_time:11.3f} {memory / naive_memory:13.3f}")


if __name__ == "__main__":
    run(main)
