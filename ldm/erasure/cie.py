"""CiE: Concept-irrelevant Erasure (Zhao et al., 2024).

On latents ``z`` of images the base model drew for the concept ``c``, at a random ``t``:

    r*    = eps*(z_t,t,c) - eps*(z_t,t,"")            the frozen concept direction
    r     = eps_theta(z_t,t,c) - eps_theta(z_t,t,"")  the edited one
    L     = mean(r * r*) + lambda * mean_l |theta_l - theta*_l|_1

Minimising ``mean(r * r*)`` turns the edited direction away from the frozen one; training stops when
the momentum statistic ``m = 0.9 m + 0.1 mean(r * r*)`` (from ``m = 0``) falls below ``tau`` after a
warm-up, or at the iteration cap. Cross-attention (``attn2``) weights train. Gradients are zeroed
every step (the public code never zeroes them, so its Adam steps on accumulated gradients).

SepCE (``ldm.erasure.sepce``) trains the same loss on its separable terms. The training images come from
``ldm.erasure.concept_data``.
"""
import math
from dataclasses import dataclass

import pandas as pd
import torch

from ldm.erasure.esd import DEFAULT_PROMPT_TEMPLATES, read_prompt_templates
from ldm.erasure.settings import MethodSettings, setting
from ldm.erasure.trainer import OverlayTrainer, select_unet_parameters
from ldm.util import UsageError, check_at_least, check_positive


def templates_of(flag):
    """The phrasing templates a ``--prompt_templates`` value names: None or 'none' for the bare concept,
    else a template file (a relative path not found from here is read from the repository root, as
    model configs name it)."""
    if flag is None or str(flag).strip().lower() == "none":
        return None
    return read_prompt_templates(flag)


@dataclass
class CiESettings(MethodSettings):
    """Everything that determines a CiE run (recorded in the run's config.yaml). Defaults: the public code's
    (SD v1); tiny-sd's config sets its own (``cie_defaults:``)."""
    prompt: str = setting(None, "the concept to erase, e.g. 'Van Gogh'", required=True, config=False)
    data_dir: str = setting(None, "training images of the concept (none: drawn by the base model, cached)",
                            config=False)
    num_images: int = setting(64, "images drawn when no --data_dir")
    iterations: int = setting(1000, "iteration cap")
    lr: float = setting(1e-6, "Adam's learning rate")
    l1_weight: float = setting(1e-5, "lambda of the L1 term")
    tau: float = setting(1e-4, "stop when the momentum statistic falls below this (negative: once the edited "
                               "direction points against the frozen one; write --tau=-2e-4)")
    warmup: int = setting(10, "iterations before the stop rule applies")
    momentum: float = setting(0.9, "momentum of the stop rule's statistic")
    batch_size: int = setting(1, "training latents per iteration")
    prompt_templates: str = setting(None, "condition the loss on phrasings of the concept, one template a line "
                                          f"with {{}} (bare flag: {DEFAULT_PROMPT_TEMPLATES}; none: the bare "
                                          "concept, as the paper)", const=DEFAULT_PROMPT_TEMPLATES, metavar="FILE")
    seed: int = setting(0, "seed of every random draw of the run", config=False)

    def check(self):
        """Refuse bad settings with one line each."""
        if not (self.prompt or "").strip():
            raise UsageError("--prompt is empty; name the concept to erase, e.g. --prompt 'Van Gogh'")
        templates_of(self.prompt_templates)
        check_positive(self, "lr")
        check_at_least(self, 1, "iterations", "batch_size", "num_images")
        check_at_least(self, 0, "l1_weight", "warmup")
        if not math.isfinite(self.tau):
            raise UsageError(f"--tau must be a number, got {self.tau}")
        if not 0 <= self.momentum < 1:
            raise UsageError(f"--momentum must be in [0, 1), got {self.momentum}")
        return self


def concept_irrelevance(r, r_star):
    """``L_dir = mean(r * r*)``: how much the edited concept direction still points along the frozen one."""
    return (r * r_star).mean()


class MomentumStop:
    """CiE's stop rule: ``m = momentum m + (1 - momentum) L_dir`` from 0; stop once ``m < tau`` after
    ``warmup`` iterations."""

    def __init__(self, tau, warmup=10, momentum=0.9):
        self.tau, self.warmup, self.momentum = tau, warmup, momentum
        self.m, self.seen, self.stop_iteration = 0.0, 0, None

    def update(self, l_dir):
        self.m = self.momentum * self.m + (1 - self.momentum) * float(l_dir)
        self.seen += 1
        if self.stop_iteration is None and self.seen > self.warmup and self.m < self.tau:
            self.stop_iteration = self.seen
        return self.stopped

    @property
    def stopped(self):
        return self.stop_iteration is not None

    def state_dict(self):
        return {"m": self.m, "seen": self.seen, "stop_iteration": self.stop_iteration}

    def load_state_dict(self, state):
        self.m, self.seen, self.stop_iteration = float(state["m"]), int(state["seen"]), state["stop_iteration"]


class ConceptDirectionLoss:
    """``L_dir`` on a batch of training latents: noised at a random ``t``, the edited and frozen
    models' concept directions compared. With several ``phrasings`` of the concept, each latent of a
    batch is conditioned on one drawn at random."""

    def __init__(self, model, phrasings, latents, device):
        self.model, self.latents = model, latents.to(device)
        with torch.no_grad():  # one batch, phrasings then "" (text-encoder numerics depend on the batch)
            contexts = model.get_learned_conditioning([*phrasings, ""]).to(device)
        self.concepts, self.uncond = contexts[:-1], contexts[-1:]

    def __call__(self, student, frozen, generator, batch_size):
        index = torch.randint(0, len(self.latents), (batch_size,), generator=generator)
        z = self.latents[index]
        t = torch.randint(0, self.model.num_timesteps, (batch_size,), generator=generator).to(z.device)
        noise = torch.randn(z.shape, generator=generator).to(z.device)
        phrasing = (torch.randint(0, len(self.concepts), (batch_size,), generator=generator)
                    if len(self.concepts) > 1 else torch.zeros(batch_size, dtype=torch.long))
        z_t = self.model.q_sample(z, t, noise)
        x, tt = torch.cat([z_t, z_t]), torch.cat([t, t])
        context = torch.cat([self.concepts[phrasing.to(z.device)], self.uncond.expand(batch_size, -1, -1)])
        with torch.no_grad():
            frozen_c, frozen_u = frozen(x, tt, context).chunk(2)
        edited_c, edited_u = student(x, tt, context).chunk(2)
        return concept_irrelevance(edited_c - edited_u, frozen_c - frozen_u)


def concept_phrasings(concept, templates=None):
    """The prompts the loss conditions on: every template filled with the concept (the bare concept without)."""
    return [t.replace("{}", concept) for t in (templates or ["{}"])]


def l1_distance(deltas):
    """``mean_l |theta_l - theta*_l|_1`` over the changed tensors ``deltas``."""
    return torch.stack([d.abs().sum() for d in deltas]).mean()


class ConceptIrrelevance:
    """CiE's objective and stop rule, shared by ``CiETrainer`` and SepCE's trainer: the trainer calls
    ``init_objective`` and provides ``student``, ``frozen`` and ``weight_deltas()`` (its changes of the
    original weights, for the L1 term)."""

    def init_objective(self, model, settings, latents):
        phrasings = concept_phrasings(settings.prompt, templates_of(settings.prompt_templates))
        self.direction = ConceptDirectionLoss(model, phrasings, latents, self.device)
        self.rule = MomentumStop(settings.tau, settings.warmup, settings.momentum)
        self.direction_losses = []

    def loss(self):
        l_dir = self.direction(self.student, self.frozen, self.generator, self.settings.batch_size)
        self._last_direction = l_dir.detach()
        return l_dir + self.settings.l1_weight * l1_distance(self.weight_deltas())

    def after_step(self, loss):
        self.direction_losses.append(float(self._last_direction))
        self.rule.update(self._last_direction)

    @property
    def stopped(self):
        return self.rule.stopped

    def summary(self):
        return {"stop_iteration": self.rule.stop_iteration, "momentum_statistic": self.rule.m,
                "direction_loss_first": self.direction_losses[0] if self.direction_losses else None}

    def extra_state(self):
        return {"rule": self.rule.state_dict(), "direction_losses": list(self.direction_losses)}

    def load_extra_state(self, state):
        self.rule.load_state_dict(state["rule"])
        self.direction_losses = list(state["direction_losses"])


class CiETrainer(ConceptIrrelevance, OverlayTrainer):
    """CiE over a ``LatentDiffusion`` model: the cross-attention weights (``attn2``) train in place."""

    def __init__(self, model, settings, latents, device="cpu", teacher_device=None, autocast_dtype=None):
        self.settings = settings.check()
        names = select_unet_parameters(model.model.diffusion_model, lambda n: "attn2" in n, "CiE (attn2)",
                                       hint="CiE trains the cross-attention layers")
        super().__init__(model, names, settings.lr, settings.seed, device, teacher_device, autocast_dtype)
        self.original = self.teacher.original_values(names)
        self.init_objective(model, settings, latents)

    def weight_deltas(self):
        return [p - self.original[n].to(p.device) for n, p in self.params.items()]


@torch.no_grad()
def direction_by_timestep(base, edited, latents, concept, timesteps=(900, 600, 300, 100), seed=0):
    """Per timestep, on ``latents`` of the concept's images noised at ``t``: the norm of the frozen concept
    direction ``r* = eps(c) - eps("")``, of the edited one ``r``, their cosine, and how far the edited
    model moved its conditional and unconditional predictions. CiE's loss ``mean(r r*)`` is an average
    over ``t``; this shows where the edit turned the direction and where it did not."""
    rows = []
    generator = torch.Generator().manual_seed(seed)
    n = len(latents)
    contexts = base.get_learned_conditioning([concept] * n + [""] * n)
    for t_value in timesteps:
        t = torch.full((n,), int(t_value), dtype=torch.long)
        z_t = base.q_sample(latents, t, torch.randn(latents.shape, generator=generator))
        x, tt = torch.cat([z_t, z_t]), torch.cat([t, t])
        base_c, base_u = base.apply_model(x, tt, contexts).float().chunk(2)
        edited_c, edited_u = edited.apply_model(x, tt, contexts).float().chunk(2)
        r_star, r = base_c - base_u, edited_c - edited_u
        rows.append({"t": int(t_value), "frozen_direction_norm": float(r_star.norm()), "edited_direction_norm": float(r.norm()),
                     "cosine": float(torch.nn.functional.cosine_similarity(r.flatten(), r_star.flatten(), dim=0)),
                     "conditional_moved": float((edited_c - base_c).norm()),
                     "unconditional_moved": float((edited_u - base_u).norm()), "latents": n})
    return pd.DataFrame(rows)
