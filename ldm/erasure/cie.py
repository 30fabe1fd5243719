"""CiE: Concept-irrelevant Erasure (Zhao et al., 2024; METHODS.md section 2).

On latents ``z`` of images the base model drew for the concept ``c``, at a random ``t``:

    r*    = eps*(z_t,t,c) - eps*(z_t,t,"")            the frozen concept direction
    r     = eps_theta(z_t,t,c) - eps_theta(z_t,t,"")  the edited one
    L     = mean(r * r*) + lambda * mean_l |theta_l - theta*_l|_1

Minimising ``mean(r * r*)`` turns the edited direction away from the frozen one; training stops when
the momentum statistic ``m = 0.9 m + 0.1 mean(r * r*)`` (from ``m = 0``) falls below ``tau`` after a
warm-up, or at the iteration cap. Cross-attention (``attn2``) weights train. Gradients are zeroed
every step (the public code never zeroes them, so its Adam steps on accumulated gradients).

SepCE (``ldm.erasure.sepce``) trains the same loss on its separable terms.
"""
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ldm.erasure.trainer import OverlayTrainer, select_unet_parameters
from ldm.generate import pixel_size
from ldm.paths import REPO_ROOT
from ldm.util import UsageError, atomic_to_csv

# The public code's defaults (SD v1); a model config may carry its own (``cie_defaults:``).
CIE_ORIGINAL_DEFAULTS = {"iterations": 1000, "lr": 1e-6, "l1_weight": 1e-5, "tau": 1e-4, "num_images": 64,
                         "batch_size": 1, "prompt_templates": None, "warmup": 10}
CONCEPT_DATA_DIR = REPO_ROOT / "outputs" / "concept-data"


def fill_defaults(args, model_defaults, original=CIE_ORIGINAL_DEFAULTS):
    """Set every flag of ``original`` the user left None from the model config's defaults, then the
    public code's."""
    for key, value in original.items():
        if getattr(args, key, None) is None:
            setattr(args, key, model_defaults.get(key, value))
    return args


def add_cie_args(parser):
    """The flags of CiE's loss and stop rule (train-sepce.py shares them)."""
    parser.add_argument("--prompt", required=True, help="the concept to erase, e.g. 'Van Gogh'")
    parser.add_argument("--data_dir", help="training images of the concept (default: drawn by the base model, cached)")
    parser.add_argument("--num_images", type=int, help="images drawn when no --data_dir (default: model config's "
                                                       "cie_defaults, else 64)")
    parser.add_argument("--iterations", type=int, help="iteration cap (default 1000, or the model config's cie_defaults)")
    parser.add_argument("--lr", type=float, help="Adam's learning rate (default 1e-6, or the model config's cie_defaults)")
    parser.add_argument("--l1_weight", type=float, help="lambda of the L1 term (default 1e-5, or cie_defaults)")
    parser.add_argument("--tau", type=float, help="stop when the momentum statistic falls below this (default 1e-4, "
                                                  "or cie_defaults; negative: once the edited direction points "
                                                  "against the frozen one; write --tau=-2e-4)")
    parser.add_argument("--warmup", type=int, help="iterations before the stop rule applies (default 10, or the "
                                                     "model config's defaults)")
    parser.add_argument("--batch_size", type=int, help="training latents per iteration (default 1, or cie_defaults)")
    from ldm.erasure.esd import DEFAULT_PROMPT_TEMPLATES
    parser.add_argument("--prompt_templates", nargs="?", const=str(DEFAULT_PROMPT_TEMPLATES), metavar="FILE",
                        help="condition the loss on phrasings of the concept, one template a line with {} (bare "
                             "flag: data/esd-prompt-templates.txt; 'none': the bare concept, as the paper); "
                             "default: the model config's cie_defaults/sepce_defaults, else the bare concept")
    return parser


def templates_of(flag):
    """The phrasing templates a ``--prompt_templates`` value names: None or 'none' for the bare concept,
    else a template file (a relative path not found from here is read from the repository root, as
    model configs name it)."""
    if flag is None or str(flag).strip().lower() == "none":
        return None
    from ldm.erasure.esd import read_prompt_templates
    from ldm.paths import resolve_path
    return read_prompt_templates(resolve_path(flag))


@dataclass
class CiESettings:
    """Everything that determines a CiE run (recorded in the run's config.yaml)."""
    concept: str
    data: dict  # the training images: folder and the generation record's SHA-256
    iterations: int = 1000
    lr: float = 1e-6
    l1_weight: float = 1e-5
    tau: float = 1e-4
    warmup: int = 10
    momentum: float = 0.9
    batch_size: int = 1
    seed: int = 0
    prompt_templates: list = None  # phrasings of the concept the loss conditions on; None: the bare concept

    def check(self):
        """Refuse contradictory settings with one line each."""
        if self.prompt_templates is not None:
            from ldm.erasure.esd import check_prompt_templates
            check_prompt_templates(self.prompt_templates)
        if not self.concept.strip():
            raise UsageError("--prompt is empty; name the concept to erase, e.g. --prompt 'Van Gogh'")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"--lr must be a positive number, got {self.lr}")
        if self.iterations < 1 or self.batch_size < 1:
            raise UsageError("--iterations and --batch_size must be >= 1")
        if self.l1_weight < 0 or self.warmup < 0 or not math.isfinite(self.tau):
            raise UsageError("--l1_weight and --warmup must be >= 0 and --tau a number")
        if not 0 <= self.momentum < 1:
            raise UsageError(f"--momentum must be in [0, 1), got {self.momentum}")
        return self

    def as_dict(self):
        return asdict(self)


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
        self.direction = ConceptDirectionLoss(model, concept_phrasings(settings.concept, settings.prompt_templates),
                                              latents, self.device)
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


# ---- training images of the concept, drawn by the base model itself (generate-data.py) ----

def concept_prompt_table(prompt, seed=0):
    """The one-row prompt table of ``prompt`` (``num_samples`` images of it are drawn from ``seed``)."""
    return pd.DataFrame({"prompt": [prompt], "evaluation_seed": [seed], "case_number": [0]})


def generate_concept_images(generator, prompt, num_images, out_dir, guidance_scale=7.5, ddim_steps=50,
                            batch_size=16, seed=0, overwrite=False, progress=True):
    """Draw ``num_images`` images of ``prompt`` with ``generator`` (an ``ldm.text2image`` generator) into
    ``out_dir`` (``0_<i>.png``, a ``prompts.csv`` and ``generation.json`` keyed by the model's identity,
    so a folder is never reused for another model or setting). Existing images are kept (resumable)."""
    from ldm.text2image import check_settings, generation_settings, make_jobs, run_jobs
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = concept_prompt_table(prompt, seed)
    prompts_path = out_dir / "prompts.csv"
    if not prompts_path.is_file() or overwrite or pd.read_csv(prompts_path).prompt.tolist() != [prompt]:
        atomic_to_csv(table, prompts_path)
    settings = generation_settings(generator.identity, prompts_path, guidance_scale, ddim_steps, num_images)
    check_settings(out_dir, settings, overwrite=overwrite)
    jobs = make_jobs(table, num_images, guidance_scale)
    run_jobs(generator, jobs, out_dir, num_images, ddim_steps, batch_size=batch_size, overwrite=overwrite,
             progress=progress)
    return out_dir


def default_data_dir(identity, prompt, num_images, guidance_scale=7.5, ddim_steps=50, seed=0):
    """The cache folder of a model's training images of ``prompt``: keyed by the model's identity and
    every sampling setting, so another model or setting never reads them."""
    from ldm.util import json_sha256
    key = json_sha256({"model": identity["sha256"], "prompt": prompt, "num_images": num_images,
                       "guidance_scale": guidance_scale, "ddim_steps": ddim_steps, "seed": seed})[:16]
    return CONCEPT_DATA_DIR / key


def data_record(folder):
    """What names a training-image folder in a run's settings: its path and its generation record's SHA-256."""
    from ldm.util import file_sha256
    folder = Path(folder)
    record = folder / "generation.json"
    return {"folder": str(folder.resolve()), "generation_sha256": file_sha256(record) if record.is_file() else None}


def read_images(folder):
    """Every PNG/JPEG in ``folder`` as a float tensor (N, 3, H, W) in [-1, 1]; none is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"--data_dir '{folder}' is not a folder; make one with eval-scripts/generate-data.py")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not paths:
        raise UsageError(f"--data_dir '{folder}' holds no images; make them with eval-scripts/generate-data.py")
    images = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1 for p in paths]
    if len({i.shape for i in images}) != 1:
        raise UsageError(f"--data_dir '{folder}' holds images of different sizes; use one size")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


@torch.no_grad()
def encode_images(model, images, batch_size=16):
    """Latents ``z`` of ``images`` (in [-1, 1]) under the model's first stage, scaled as the UNet sees them:
    the posterior's mode, so the same images always give the same latents (a posterior sample would
    draw from the global RNG and make every run differ)."""
    side = pixel_size(model)
    if images.shape[-1] != side or images.shape[-2] != side:
        raise UsageError(f"training images are {images.shape[-1]}x{images.shape[-2]} pixels; this model draws "
                         f"{side}x{side}; generate them with this model (eval-scripts/generate-data.py)")
    device = model.betas.device
    chunks = [model.get_first_stage_encoding(model.encode_first_stage(images[i:i + batch_size].to(device)).mode())
              for i in range(0, len(images), batch_size)]
    return torch.cat(chunks).float()


def prepare_training_latents(loaded, prompt, data_dir=None, num_images=64, progress=True):
    """The training latents of a CiE/SepCE run and the record of their folder: ``data_dir`` when given,
    else the base model's (``loaded``, an ``ldm.loading.LoadedModel``) own images of ``prompt``,
    generated once into a cache keyed by its identity."""
    if data_dir is None:
        from ldm.text2image import CompVisModel
        data_dir = default_data_dir(loaded.identity, prompt, num_images)
        generate_concept_images(CompVisModel(loaded), prompt, num_images, data_dir, progress=progress)
    return encode_images(loaded.model, read_images(data_dir)), data_record(data_dir)
