"""ESD: Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023).

The model is fine-tuned so that, conditioned on the concept ``c``, it predicts the frozen model's
negatively guided noise:  ``eps*(x_t, t, "") - eta * (eps*(x_t, t, c) - eps*(x_t, t, ""))``.

One UNet is kept in memory: the frozen teacher is the same module called with the original values
of only the trained parameters (``torch.func.functional_call``), so ESD-x costs one model plus the
cross-attention weights, their copy and their optimizer state.
"""
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm.erasure.trainer import Denoiser, OverlayTrainer, select_unet_parameters
from ldm.generate import latent_shape
from ldm.models.diffusion.ddim import ddim_sample
from ldm.paths import REPO_ROOT
from ldm.util import UsageError


def _out_layer(name):
    return name.startswith("out.")


# Which UNet parameters each --train_method trains (names relative to the UNet, as in CompVis).
TRAIN_METHODS = {
    "xattn": lambda n: "attn2" in n,
    "noxattn": lambda n: not (_out_layer(n) or "attn2" in n or "time_embed" in n),
    "selfattn": lambda n: "attn1" in n,
    "full": lambda n: True,
    "notime": lambda n: not (_out_layer(n) or "time_embed" in n),
    "xlayer": lambda n: "attn2" in n and ("output_blocks.6." in n or "output_blocks.8." in n),
    "selflayer": lambda n: "attn1" in n and ("input_blocks.4." in n or "input_blocks.7." in n),
    "esd-x-strict": lambda n: "attn2.to_k" in n or "attn2.to_v" in n,
}
METHOD_ALIASES = {"esd-x": "xattn", "esd-u": "noxattn", "esd-all": "full"}

# The original script's prompt macros.
PROMPT_MACROS = {
    "allartist": "Kelly Mckernan, Thomas Kinkade, Ajin Demi Human, Alena Aenami, Tyler Edlin, Kilian Eng",
    "i2p": "hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity, bodily fluids, blood",
    "artifact": ("ugly, tiling, poorly drawn hands, poorly drawn feet, poorly drawn face, out of frame, mutation, "
                 "mutated, extra limbs, extra legs, extra arms, disfigured, deformed, cross-eye, body out of frame, "
                 "blurry, bad art, bad anatomy, blurred, text, watermark, grainy"),
}

# Generic phrasings for --prompt_templates (none copies an evaluation prompt of data/tiny-sd/).
DEFAULT_PROMPT_TEMPLATES = REPO_ROOT / "data" / "esd-prompt-templates.txt"

# The original CompVis script's defaults (SD v1); a model config may carry its own (``esd_defaults:``).
ORIGINAL_DEFAULTS = {"iterations": 1000, "lr": 1e-5, "start_guidance": 3.0, "negative_guidance": 1.0,
                     "ddim_steps": 50, "sample_from": "esd", "targets_per_trajectory": 1}


def with_defaults(chosen, model_defaults):
    """The settings in ``chosen`` (None where the user gave none) filled from a model config's
    ``esd_defaults`` over ``ORIGINAL_DEFAULTS``. Trajectory reuse taken from the defaults follows the
    user's own choices: one target per trajectory when they sample with the model being trained, at
    most one per DDIM step."""
    filled = {k: chosen.get(k) for k in ORIGINAL_DEFAULTS}
    from_defaults = {k for k, v in filled.items() if v is None}
    filled.update({k: {**ORIGINAL_DEFAULTS, **model_defaults}[k] for k in from_defaults})
    if "targets_per_trajectory" in from_defaults:
        reuse = filled["targets_per_trajectory"] if filled["sample_from"] == "base" else 1
        filled["targets_per_trajectory"] = min(reuse, filled["ddim_steps"])
    return filled


def canonical_method(train_method):
    """The canonical name of ``train_method`` (aliases such as ``esd-x`` resolved); unknown is an error."""
    name = METHOD_ALIASES.get(train_method, train_method)
    if name not in TRAIN_METHODS:
        valid = ", ".join(list(TRAIN_METHODS) + list(METHOD_ALIASES))
        raise UsageError(f"train method '{train_method}' unknown; use one of: {valid}")
    return name


def select_parameters(unet, train_method):
    """Names (relative to the UNet) of the parameters ``train_method`` trains; none is an error."""
    return select_unet_parameters(unet, TRAIN_METHODS[canonical_method(train_method)],
                                  f"train method '{train_method}'", hint="choose another --train_method")


def concept_words(prompt, seperator=None):
    """The concepts to erase: macros expanded, split on ``seperator`` (the original's spelling)."""
    prompt = PROMPT_MACROS.get(prompt, prompt)
    words = [w.strip() for w in prompt.split(seperator)] if seperator else [prompt.strip()]
    words = [w for w in words if w]
    if not words:
        raise UsageError("--prompt is empty; name the concept to erase, e.g. --prompt 'Van Gogh'")
    return words


def run_name(prompt, train_method, start_guidance, negative_guidance, iterations, lr):
    """The original script's run name, e.g. ``compvis-word_VanGogh-method_xattn-sg_3-ng_1-iter_1000-lr_1e-05``."""
    def number(x):
        return str(int(x)) if float(x).is_integer() else str(x)
    return (f"compvis-word_{prompt.replace(' ', '')}-method_{train_method}-sg_{number(start_guidance)}"
            f"-ng_{number(negative_guidance)}-iter_{iterations}-lr_{lr}")


def ddpm_timestep_interval(t_enc, ddim_steps, num_timesteps=1000):
    """The DDPM timesteps ``[lo, hi)`` that DDIM step ``t_enc`` (0 = least noisy) covers: the sampler's
    spacing ``c = num_timesteps // ddim_steps`` puts that step at ``c t_enc + 1``, inside
    ``[c t_enc, c (t_enc + 1))``; the noisiest step's interval runs to ``num_timesteps``. For 50 steps
    this is ESD's ``[20 t_enc, 20 t_enc + 20)``."""
    spacing = num_timesteps // ddim_steps
    hi = num_timesteps if t_enc == ddim_steps - 1 else spacing * (t_enc + 1)
    return spacing * t_enc, hi


def steps_to_reach(t_enc, ddim_steps):
    """How many DDIM steps to run from ``x_T`` so that ``x_t`` sits at DDIM step ``t_enc``'s own timestep,
    inside ``ddpm_timestep_interval(t_enc)``. ``ddim_steps - t_enc`` (the original's count, off by one
    more in its code) leaves ``x_t`` one DDIM step less noisy than the timestep the loss is told."""
    return ddim_steps - 1 - t_enc


def esd_target(e_anchor, e_uncond, e_concept, negative_guidance):
    """ESD's negatively guided target: ``e_anchor - eta * (e_concept - e_uncond)``.

    ``e_anchor`` is the unconditional prediction for plain ESD, the prediction for ``--erase_from``'s
    concept B for attribute erasure.
    """
    return e_anchor - negative_guidance * (e_concept - e_uncond)


@dataclass
class ESDSettings:
    """Everything that determines an ESD run (recorded in the run's config.yaml)."""
    words: list
    train_method: str = "xattn"
    start_guidance: float = 3.0
    negative_guidance: float = 1.0
    iterations: int = 1000
    lr: float = 1e-5
    ddim_steps: int = 50
    image_size: int = 512
    sample_from: str = "esd"
    erase_from: str = None
    targets_per_trajectory: int = 1
    seed: int = 0
    prompt_templates: list = None  # phrasings of the concept ("a picture of {}"); None: the bare words

    def check(self):
        """Refuse contradictory settings with one line each."""
        canonical_method(self.train_method)
        if self.sample_from not in ("esd", "base"):
            raise UsageError(f"--sample_from '{self.sample_from}' unknown; use 'esd' or 'base'")
        if self.erase_from is not None and self.erase_from.strip() in self.words:
            raise UsageError(f"--erase_from '{self.erase_from}' equals the concept to erase; "
                             "name the broader concept it should be erased from (e.g. 'cowboy' for 'cowboy hat')")
        if self.targets_per_trajectory < 1:
            raise UsageError("--targets_per_trajectory must be >= 1")
        if self.targets_per_trajectory > 1 and self.sample_from != "base":
            raise UsageError("--targets_per_trajectory > 1 reuses the frozen model's sampling trajectory; "
                             "it needs --sample_from base")
        if self.targets_per_trajectory > self.ddim_steps:
            raise UsageError(f"--targets_per_trajectory must be <= --ddim_steps ({self.ddim_steps})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"--lr must be a positive number, got {self.lr}")
        if self.iterations < 1 or self.ddim_steps < 1:
            raise UsageError("--iterations and --ddim_steps must be >= 1")
        if self.prompt_templates is not None:
            check_prompt_templates(self.prompt_templates)
            if self.erase_from is not None:
                raise UsageError("--prompt_templates and --erase_from cannot be combined; "
                                 "write the phrasings of 'A in B' yourself as --prompt with --erase_from")
        return self

    def phrasings(self):
        """The prompts the concept is trained on: every template filled with every word."""
        return [t.replace("{}", w) for w in self.words for t in (self.prompt_templates or ["{}"])]

    def as_dict(self):
        return asdict(self)


def check_prompt_templates(templates, source="--prompt_templates"):
    """Refuse an empty template list or a template without exactly one ``{}``, with one line."""
    if not templates:
        raise UsageError(f"{source} holds no templates; write one phrasing a line, with {{}} for the concept")
    for template in templates:
        if template.count("{}") != 1:
            raise UsageError(f"{source}: template '{template}' must contain {{}} exactly once (where the concept goes)")
    return list(templates)


def read_prompt_templates(path):
    """Templates from a text file: one a line with ``{}`` for the concept; blank lines and ``#`` comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--prompt_templates file '{path}' does not exist; give a text file with one template a line")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return check_prompt_templates([line for line in lines if line and not line.startswith("#")], source=str(path))


class ESDTrainer(OverlayTrainer):
    """ESD's training loop over a ``LatentDiffusion`` model, one training target per iteration.

    ``step()`` runs one iteration; ``state_dict()``/``load_state_dict()`` hold everything a resumed
    run needs (trained weights, optimizer, RNG, iteration, losses) so that resuming gives the same
    weights as an uninterrupted run.
    """

    def __init__(self, model, settings, device="cpu", teacher_device=None, autocast_dtype=None):
        self.settings = settings.check()
        super().__init__(model, select_parameters(model.model.diffusion_model, settings.train_method), settings.lr,
                         settings.seed, device, teacher_device, autocast_dtype)
        self._pending = []  # reused-trajectory targets not yet trained on
        with torch.no_grad():
            phrasings = settings.phrasings()
            prompts = ["", *phrasings] + ([settings.erase_from] if settings.erase_from else [])
            embeddings = model.get_learned_conditioning(prompts).to(self.device)
        self.uncond = embeddings[:1]
        self.concepts = embeddings[1:1 + len(phrasings)]  # one per word and phrasing
        self.anchor = embeddings[-1:] if settings.erase_from else None
        self.latent_shape = latent_shape(model, settings.image_size)

    def _targets(self):
        """``(x_t, t, context for the student, target)`` for the next iteration."""
        s = self.settings
        if s.targets_per_trajectory > 1:
            if not self._pending:
                self._pending = self._trajectory_targets()
            return self._pending.pop(0)
        concept, sample_with, x_T = self._draw_concept_and_noise()
        t_enc = self.randint(s.ddim_steps)  # DDIM step, 0 = least noisy
        lo, hi = ddpm_timestep_interval(t_enc, s.ddim_steps, self.model.num_timesteps)
        t = torch.tensor([self.randint(hi, lo)], device=self.device)
        sampler = self.frozen if s.sample_from == "base" else self.student
        with torch.no_grad():
            # run the steps above t_enc, so that x_t sits at DDIM step t_enc's timestep, inside [lo, hi)
            x_t, _ = ddim_sample(Denoiser(self.model, sampler), x_T, sample_with, self.uncond, s.start_guidance,
                                 num_steps=s.ddim_steps, till_T=steps_to_reach(t_enc, s.ddim_steps))
            contexts = [self.uncond, concept] + ([self.anchor] if self.anchor is not None else [])
            e = self.frozen(x_t.expand(len(contexts), -1, -1, -1), t.expand(len(contexts)), torch.cat(contexts))
        return self._target(x_t, t, concept, e_uncond=e[0:1], e_concept=e[1:2], e_anchor=e[2:3])

    def _draw_concept_and_noise(self):
        phrasing = self.randint(len(self.concepts))
        concept = self.concepts[phrasing:phrasing + 1]
        sample_with = self.anchor if self.anchor is not None else concept  # erase_from: x_t shows B
        x_T = torch.randn((1, *self.latent_shape), generator=self.generator).to(self.device)
        return concept, sample_with, x_T

    def _target(self, x_t, t, concept, e_uncond, e_concept, e_anchor):
        """The training tuple; with ``--erase_from`` the student sees B and the anchor is eps*(B)."""
        if self.anchor is None:
            return x_t, t, concept, esd_target(e_uncond, e_uncond, e_concept, self.settings.negative_guidance)
        return x_t, t, self.anchor, esd_target(e_anchor, e_uncond, e_concept, self.settings.negative_guidance)

    @torch.no_grad()
    def _trajectory_targets(self):
        """Trajectory reuse: one frozen-model CFG trajectory supplies ``targets_per_trajectory`` targets.

        Its batched unconditional/conditional predictions at each visited ``x_t`` are exactly the
        teacher's predictions there, so they cost nothing extra (the concept prediction for
        ``--erase_from`` costs one forward per target). ``t`` is the DDIM step's own timestep.
        """
        s = self.settings
        concept, sample_with, x_T = self._draw_concept_and_noise()
        chosen = sorted(torch.randperm(s.ddim_steps, generator=self.generator)[:s.targets_per_trajectory].tolist(),
                        reverse=True)
        visited = []

        def recording_teacher(x, t, context):
            e = self.frozen(x, t, context)
            if x.shape[0] == 1:  # guidance 1: the sampler skipped the unconditional half
                visited.append((x, t, self.frozen(x, t, self.uncond), e))
            else:
                visited.append((x[:1], t[:1], *e.chunk(2)))
            return e

        ddim_sample(Denoiser(self.model, recording_teacher), x_T, sample_with, self.uncond, s.start_guidance,
                    num_steps=s.ddim_steps, till_T=s.ddim_steps - min(chosen))
        targets = []
        for index in chosen:  # DDIM index, visited in the sampler's order (noisiest first)
            x_t, t, e_uncond, e_cond = visited[s.ddim_steps - 1 - index]
            if self.anchor is None:
                targets.append(self._target(x_t, t, concept, e_uncond, e_cond, None))
            else:
                targets.append(self._target(x_t, t, concept, e_uncond, self.frozen(x_t, t, concept), e_cond))
        return targets

    def loss(self):
        """ESD's loss: the student's prediction against the negatively guided target."""
        x_t, t, context, target = self._targets()
        return F.mse_loss(self.student(x_t, t, context), target)

    def extra_state(self):
        return {"pending": [tuple(v.cpu() for v in p) for p in self._pending]}

    def load_extra_state(self, state):
        self._pending = [tuple(v.to(self.device) for v in p) for p in state["pending"]]
