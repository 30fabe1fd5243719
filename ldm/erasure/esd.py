"""ESD: Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023).

The model is fine-tuned so that, conditioned on the concept ``c``, it predicts the frozen model's
negatively guided noise:  ``eps*(x_t, t, "") - eta * (eps*(x_t, t, c) - eps*(x_t, t, ""))``.

One UNet is kept in memory: the frozen teacher is the same module called with the original values
of only the trained parameters (``torch.func.functional_call``), so ESD-x costs one model plus the
cross-attention weights, their copy and their optimizer state.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ldm.erasure.settings import MethodSettings, setting
from ldm.erasure.trainer import Denoiser, OverlayTrainer, select_unet_parameters
from ldm.generate import latent_shape
from ldm.models.diffusion.ddim import ddim_sample
from ldm.paths import resolve_path
from ldm.prompts import read_lines
from ldm.util import UsageError, check_at_least, check_positive


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
    "xattn-strict": lambda n: "attn2.to_k" in n or "attn2.to_v" in n,
}
# The original script's prompt macros.
PROMPT_MACROS = {
    "allartist": "Kelly Mckernan, Thomas Kinkade, Ajin Demi Human, Alena Aenami, Tyler Edlin, Kilian Eng",
    "i2p": "hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity, bodily fluids, blood",
    "artifact": ("ugly, tiling, poorly drawn hands, poorly drawn feet, poorly drawn face, out of frame, mutation, "
                 "mutated, extra limbs, extra legs, extra arms, disfigured, deformed, cross-eye, body out of frame, "
                 "blurry, bad art, bad anatomy, blurred, text, watermark, grainy"),
}

# Generic phrasings for --prompt_templates (none copies an evaluation prompt of data/tiny-sd/).
DEFAULT_PROMPT_TEMPLATES = "data/esd-prompt-templates.txt"


def select_parameters(unet, train_method):
    """Names (relative to the UNet) of the parameters ``train_method`` trains; none is an error."""
    if train_method not in TRAIN_METHODS:
        raise UsageError(f"train method '{train_method}' unknown; use one of: {', '.join(TRAIN_METHODS)}")
    return select_unet_parameters(unet, TRAIN_METHODS[train_method], f"train method '{train_method}'",
                                  hint="choose another --train_method")


def concept_words(prompt, seperator=None):
    """The concepts to erase: macros expanded, split on ``seperator`` (the original's spelling)."""
    prompt = PROMPT_MACROS.get(prompt, prompt or "")
    words = [w.strip() for w in prompt.split(seperator)] if seperator else [prompt.strip()]
    words = [w for w in words if w]
    if not words:
        raise UsageError("--prompt is empty; name the concept to erase, e.g. --prompt 'Van Gogh'")
    return words


def run_name(settings):
    """The original script's run name, e.g. ``compvis-word_VanGogh-method_xattn-sg_3-ng_1-iter_1000-lr_1e-05``."""
    def number(x):
        return str(int(x)) if float(x).is_integer() else str(x)
    s = settings
    return (f"compvis-word_{s.prompt.replace(' ', '')}-method_{s.train_method}-sg_{number(s.start_guidance)}"
            f"-ng_{number(s.negative_guidance)}-iter_{s.iterations}-lr_{s.lr}")


def ddpm_timestep_interval(t_enc, ddim_steps, num_timesteps=1000):
    """The DDPM timesteps ``[lo, hi)`` that DDIM step ``t_enc`` (0 = least noisy) covers: the sampler's
    spacing ``c = num_timesteps // ddim_steps`` puts that step at ``c t_enc + 1``, inside
    ``[c t_enc, c (t_enc + 1))``; the noisiest step's interval runs to ``num_timesteps``. For 50 steps
    this is ESD's ``[20 t_enc, 20 t_enc + 20)``."""
    spacing = num_timesteps // ddim_steps
    hi = num_timesteps if t_enc == ddim_steps - 1 else spacing * (t_enc + 1)
    return spacing * t_enc, hi


def steps_to_reach(t_enc, ddim_steps, x_t="t"):
    """How many DDIM steps to run from ``x_T`` for the ``x_t`` of DDIM step ``t_enc`` (0 = least noisy).

    ``"t"``: ``x_t`` sits at that step's own timestep, inside ``ddpm_timestep_interval(t_enc)``, the noise
    level the loss is told. ``"authors"``: the original CompVis script's count: its sampler breaks after the
    step whose ``index + 1 == t_enc`` (``t_enc`` 0: never), i.e. after ``ddim_steps - max(t_enc - 1, 0)``
    steps, which leaves ``x_t`` two DDIM steps less noisy than the timestep the loss is told, and ``x_0``
    for ``t_enc`` 0 and 1."""
    if x_t == "authors":
        return ddim_steps - max(t_enc - 1, 0)
    return ddim_steps - 1 - t_enc


def esd_target(e_anchor, e_uncond, e_concept, negative_guidance):
    """ESD's negatively guided target: ``e_anchor - eta * (e_concept - e_uncond)``.

    ``e_anchor`` is the unconditional prediction for plain ESD, the prediction for ``--erase_from``'s
    concept B for attribute erasure.
    """
    return e_anchor - negative_guidance * (e_concept - e_uncond)


@dataclass
class ESDSettings(MethodSettings):
    """Everything that determines an ESD run (recorded in the run's config.yaml). Defaults: the original
    CompVis script's (SD v1); tiny-sd's config sets its own (``esd_defaults:``)."""
    prompt: str = setting(None, "concept to erase, or a macro: allartist, i2p, artifact", required=True, config=False)
    seperator: str = setting(None, "split --prompt on this to erase several concepts (e.g. ',')", config=False,
                             aliases=("separator",))
    train_method: str = setting("xattn", "which UNet parameters train: " + ", ".join(TRAIN_METHODS), variant=True,
                                config=False)
    start_guidance: float = setting(3.0, "CFG scale sampling x_t")
    negative_guidance: float = setting(
        1.0, 'eta in the original\'s target eps("") - eta (eps(c) - eps("")); the authors\' later code writes '
             'eps(c) - eta\' (eps(c) - eps("")), so its default eta\' = 2 is eta = 1 here. With --erase_from the target '
             'is eps(B) - eta (eps(c) - eps("")) in both, and the default is the later code\'s 2')
    iterations: int = setting(1000, "training iterations")
    lr: float = setting(1e-5, "Adam's learning rate")
    ddim_steps: int = setting(50, "DDIM steps of the sampler that draws x_t")
    image_size: int = setting(None, "pixels of the sampled x_t (none: the model's own size)", type=int)
    prompt_templates: str = setting(None, "train on phrasings of the concept, one template a line with {} (bare "
                                          f"flag: {DEFAULT_PROMPT_TEMPLATES}; none: the bare concept, as the paper)",
                                    const=DEFAULT_PROMPT_TEMPLATES, metavar="FILE")
    erase_from: str = setting(None, "erase the concept only where it appears with this one (x_t drawn with it, the "
                                    "student conditioned on it); erasure-report.py then reports it", config=False)
    sample_from: str = setting("esd", "who samples x_t: the model being trained (esd, the original) or the frozen "
                                      "one (base, the authors' later code)", choices=("esd", "base"))
    targets_per_trajectory: int = setting(1, "with --sample_from base: training targets taken from one sampling "
                                             "trajectory")
    x_t: str = setting("t", "the noise level of x_t: t (the timestep the loss is told) or authors (the original "
                            "script's, two DDIM steps cleaner; x_0 at the two least noisy steps)",
                       choices=("t", "authors"))
    seed: int = setting(0, "seed of every random draw of the run", config=False)

    @classmethod
    def adjust_defaults(cls, values, sources):
        """Defaults that follow the user's own choices: trajectory reuse is one target per trajectory when the
        model being trained samples, at most one per DDIM step; with --erase_from the paper's negative
        guidance is the authors' later code's 2 (the original script has no --erase_from)."""
        if values["erase_from"] is not None and sources["negative_guidance"] == "paper":
            values["negative_guidance"] = 2.0
        if sources["targets_per_trajectory"] != "flag":
            reuse = values["targets_per_trajectory"] if values["sample_from"] == "base" else 1
            values["targets_per_trajectory"] = min(reuse, values["ddim_steps"])

    def concepts(self):
        """The concepts to erase (macros expanded, split on ``seperator``)."""
        return concept_words(self.prompt, self.seperator)

    def templates(self):
        """The phrasing templates (None, for no file or 'none': the bare words)."""
        if self.prompt_templates is None or str(self.prompt_templates).strip().lower() == "none":
            return None
        return read_prompt_templates(self.prompt_templates)

    def check(self):
        """Refuse bad or contradictory settings with one line each."""
        super().check()
        words = self.concepts()
        if self.train_method not in TRAIN_METHODS:
            raise UsageError(f"train method '{self.train_method}' unknown; use one of: {', '.join(TRAIN_METHODS)}")
        if self.erase_from is not None and self.erase_from.strip() in words:
            raise UsageError(f"--erase_from '{self.erase_from}' equals the concept to erase; "
                             "name the broader concept it should be erased from (e.g. 'cowboy' for 'cowboy hat')")
        check_at_least(self, 1, "iterations", "ddim_steps", "targets_per_trajectory")
        if self.image_size is not None:
            check_at_least(self, 8, "image_size")
        check_positive(self, "lr", "negative_guidance")
        if not (self.start_guidance >= 0 and math.isfinite(self.start_guidance)):
            raise UsageError(f"--start_guidance must be >= 0, got {self.start_guidance}")
        if self.targets_per_trajectory > 1 and self.sample_from != "base":
            raise UsageError("--targets_per_trajectory > 1 reuses the frozen model's sampling trajectory; "
                             "it needs --sample_from base")
        if self.x_t == "authors" and self.targets_per_trajectory > 1:
            raise UsageError("--x_t authors reproduces the original script, one target per sampling trajectory; "
                             "use --targets_per_trajectory 1 (or --x_t t)")
        if self.targets_per_trajectory > self.ddim_steps:
            raise UsageError(f"--targets_per_trajectory must be <= --ddim_steps ({self.ddim_steps})")
        if self.templates() is not None:
            if self.erase_from is not None:
                raise UsageError("--prompt_templates and --erase_from cannot be combined; "
                                 "write the phrasings of 'A in B' yourself as --prompt with --erase_from")
        return self

    def phrasings(self):
        """The prompts the concept is trained on: every template filled with every word."""
        return [t.replace("{}", w) for w in self.concepts() for t in (self.templates() or ["{}"])]


def check_prompt_templates(templates, source="--prompt_templates"):
    """Refuse an empty template list or a template without exactly one ``{}``, with one line."""
    if not templates:
        raise UsageError(f"{source} holds no templates; write one phrasing a line, with {{}} for the concept")
    for template in templates:
        if template.count("{}") != 1:
            raise UsageError(f"{source}: template '{template}' must contain {{}} exactly once (where the concept goes)")
    return list(templates)


def read_prompt_templates(path):
    """Templates from a text file (a relative path not found from here is read from the repository root):
    one a line with ``{}`` for the concept; blank lines and ``#`` comments skipped."""
    return check_prompt_templates(read_lines(path, "template", "--prompt_templates"), source=str(resolve_path(path)))


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
        self.latent_shape = latent_shape(model, settings.image_size)  # None: the model's own size

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
            # run the steps above t_enc: x_t at DDIM step t_enc's timestep, inside [lo, hi) (or the authors' x_t)
            x_t, _ = ddim_sample(Denoiser(self.model, sampler), x_T, sample_with, self.uncond, s.start_guidance,
                                 num_steps=s.ddim_steps, till_T=steps_to_reach(t_enc, s.ddim_steps, s.x_t))
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
