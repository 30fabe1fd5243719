"""CiE: Concept-irrelevant Erasure (Zhao et al., 2024).

On latents ``z`` of images the base model drew for the concept ``c``, at a random ``t``:

    r*    = eps*(z_t,t,c) - eps*(z_t,t,"")            the frozen concept direction
    r     = eps_theta(z_t,t,c) - eps_theta(z_t,t,"")  the edited one
    L     = L_dir + lambda * mean_l |theta_l - theta*_l|_1
    L_dir = mean(r * r*)      (``--direction_loss agreeing``: mean(r * r* * [r * r* > 0]), bounded below by 0)

Minimising ``L_dir`` turns the edited direction away from the frozen one; training stops when the momentum
statistic ``m = 0.9 m + 0.1 L_dir`` (from the first ``L_dir``, or 0 with ``--momentum_start zero``) falls
below ``tau`` after a warm-up, or at the iteration cap. Cross-attention (``attn2``) weights train. As in the
public code, Adam steps on the sum of every gradient so far (``--gradients accumulate``; ``zero``: each
iteration's own). ``lambda`` is ``--l1_weight`` (``--l1_scale absolute``, the public code's), or
``--l1_weight`` times the first iteration's pull of ``L_dir`` on the weights (``relative``, see
``relative_l1_lambda``), so that it means the same on every model.

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

L1_SCALES = ("absolute", "relative")
GRADIENTS = ("accumulate", "zero")
DIRECTION_LOSSES = ("all", "agreeing")
MOMENTUM_STARTS = ("first", "zero")


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
    l1_weight: float = setting(1e-5, "weight of the L1 term: lambda itself (--l1_scale absolute), or rho, the L1 "
                                     "pull on each weight as a fraction of the direction loss's RMS pull at the "
                                     "first iteration (relative)")
    l1_scale: str = setting("absolute", "absolute: --l1_weight is lambda, as the public code (its meaning depends on "
                                        "the model); relative: lambda = l1_weight x tensors x RMS of dL_dir/dW at "
                                        "the first iteration, per concept", choices=L1_SCALES)
    gradients: str = setting("accumulate", "accumulate: Adam steps on the sum of all gradients so far, as the public "
                                           "code (never zeroed); zero: on each iteration's own", choices=GRADIENTS)
    direction_loss: str = setting("all", "all: L_dir = mean(r r*) (the public code); agreeing: only the elements where "
                                         "r and r* agree count (bounded below by 0; commented out in the public "
                                         "code)", choices=DIRECTION_LOSSES)
    tau: float = setting(5e-5, "stop when the momentum statistic falls below this (negative: once the edited "
                               "direction points against the frozen one; write --tau=-2e-4)")
    warmup: int = setting(10, "iterations before the stop rule applies")
    momentum: float = setting(0.9, "momentum of the stop rule's statistic")
    momentum_start: str = setting("first", "the stop rule's statistic starts at the first iteration's L_dir (the "
                                           "public code) or at zero", choices=MOMENTUM_STARTS)
    batch_size: int = setting(1, "training latents per iteration")
    prompt_templates: str = setting(None, "condition the loss on phrasings of the concept, one template a line "
                                          f"with {{}} (bare flag: {DEFAULT_PROMPT_TEMPLATES}; none: the bare "
                                          "concept, as the paper)", const=DEFAULT_PROMPT_TEMPLATES, metavar="FILE")
    seed: int = setting(0, "seed of every random draw of the run", config=False)

    def check(self):
        """Refuse bad settings with one line each."""
        super().check()
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
        if self.direction_loss == "agreeing" and self.tau <= 0:
            raise UsageError(f"--tau={self.tau} can never stop --direction_loss agreeing (it is never negative); "
                             "use a positive tau, e.g. 5e-5")
        return self


def concept_irrelevance(r, r_star, agreeing=False):
    """``L_dir = mean(r * r*)``: how much the edited concept direction still points along the frozen one.
    ``agreeing``: only the elements where the two agree count (the mean is still over all elements), so the
    loss is bounded below by 0 and an element already turned away pulls no further."""
    product = r * r_star
    return (product * (product > 0)).mean() if agreeing else product.mean()


class MomentumStop:
    """CiE's stop rule: ``m = momentum m + (1 - momentum) L_dir``, starting at the first ``L_dir`` (``start``
    'first', the public code) or at 0 ('zero'); stop once ``m < tau`` after ``warmup`` iterations."""

    def __init__(self, tau, warmup=10, momentum=0.9, start="first"):
        self.tau, self.warmup, self.momentum, self.start = tau, warmup, momentum, start
        self.m, self.seen, self.stop_iteration = 0.0, 0, None

    def update(self, l_dir):
        """Add one iteration's ``L_dir``; returns whether the rule has stopped training."""
        if self.seen == 0 and self.start == "first":
            self.m = float(l_dir)
        else:
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

    def __init__(self, model, phrasings, latents, device, agreeing=False):
        self.model, self.latents, self.agreeing = model, latents.to(device), agreeing
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
        return concept_irrelevance(edited_c - edited_u, frozen_c - frozen_u, self.agreeing)


def concept_phrasings(concept, templates=None):
    """The prompts the loss conditions on: every template filled with the concept (the bare concept without)."""
    return [t.replace("{}", concept) for t in (templates or ["{}"])]


def l1_distance(deltas):
    """``mean_l |theta_l - theta*_l|_1`` over the changed tensors ``deltas``."""
    return torch.stack([d.abs().sum() for d in deltas]).mean()


def relative_l1_lambda(direction_gradients, rho):
    """``lambda`` such that the L1 term pulls each changed weight by ``rho`` times the RMS of the direction
    loss's gradient over the ``direction_gradients`` (one per trained tensor, d L_dir / d W): the L1
    term's gradient per element is ``lambda / tensors``, so ``lambda = rho * tensors * RMS``. Free of the
    model's size: the element and tensor counts and the scale of ``L_dir`` cancel."""
    squares = sum(float(g.double().pow(2).sum()) for g in direction_gradients)
    elements = sum(g.numel() for g in direction_gradients)
    return rho * len(direction_gradients) * math.sqrt(squares / max(elements, 1))


class ConceptIrrelevance:
    """CiE's objective and stop rule, shared by ``CiETrainer`` and SepCE's trainer: the trainer calls
    ``init_objective`` and provides ``student``, ``frozen``, ``weight_deltas()`` (its changes of the
    original weights, for the L1 term) and ``edited_weights()`` (tensors whose gradient is d L / d W of
    the edited weights, after a ``student`` call). Each trainer erases one concept, so the relative L1
    weight and the stop rule are each concept's own."""

    def init_objective(self, model, settings, latents):
        phrasings = concept_phrasings(settings.prompt, templates_of(settings.prompt_templates))
        self.direction = ConceptDirectionLoss(model, phrasings, latents, self.device,
                                              agreeing=settings.direction_loss == "agreeing")
        self.rule = MomentumStop(settings.tau, settings.warmup, settings.momentum, settings.momentum_start)
        self.direction_losses = []
        self.l1_lambda = settings.l1_weight if settings.l1_scale == "absolute" else None
        if settings.gradients == "accumulate":
            self.accumulate_gradients()

    def loss(self):
        l_dir = self.direction(self.student, self.frozen, self.generator, self.settings.batch_size)
        self._last_direction = l_dir.detach()
        if self.l1_lambda is None:  # relative: calibrated on the first iteration, where every delta is 0
            gradients = torch.autograd.grad(l_dir, self.edited_weights(), retain_graph=True, allow_unused=True)
            self.l1_lambda = relative_l1_lambda([g for g in gradients if g is not None], self.settings.l1_weight)
        return l_dir + self.l1_lambda * l1_distance(self.weight_deltas())

    def after_step(self, loss):
        self.direction_losses.append(float(self._last_direction))
        self.rule.update(self._last_direction)

    @property
    def stopped(self):
        return self.rule.stopped

    def summary(self):
        return {"stop_iteration": self.rule.stop_iteration, "momentum_statistic": self.rule.m,
                "direction_loss_first": self.direction_losses[0] if self.direction_losses else None,
                "l1_lambda": self.l1_lambda}

    def extra_state(self):
        return {"rule": self.rule.state_dict(), "direction_losses": list(self.direction_losses),
                "l1_lambda": self.l1_lambda}

    def load_extra_state(self, state):
        self.rule.load_state_dict(state["rule"])
        self.direction_losses = list(state["direction_losses"])
        self.l1_lambda = state["l1_lambda"]


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

    def edited_weights(self):
        return list(self.params.values())


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
