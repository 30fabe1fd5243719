"""CPE: Concept Pinpoint Eraser with Residual Attention Gates (Lee et al., ICLR 2025; METHODS.md section 3).

A ResAG is added to every cross-attention ``to_k`` and ``to_v``; on the text embedding ``E`` (tokens x width):

    Q = E U1,  K = E U2,  P = softmax(Q K^T / sqrt(r_gate)),  Ebar = P E,  g = sigmoid(Ebar v)
    out = W E + (g * Ebar) A_l B_l (alpha / r)

The gate (``U1``, ``U2``, ``v``) is shared by every layer of one concept; ``A_l``, ``B_l`` are per layer;
``B`` and ``v`` start at zero, so an untrained ResAG changes nothing. The public code builds ``K`` from
``U1`` too (``U2`` never trains); here ``K = E U2``, as the paper writes. With several concepts each token
takes the residual of the concept whose gate is highest on it.

Training never runs the UNet: every loss compares ``to_k``/``to_v`` outputs on text embeddings, each
layer's squared error weighted by its Lipschitz estimate (``to_k``: sigma(W_o W_v) sigma(W_q) / tokens,
``to_v``: sigma(W_o)):

- erase: ``|| W c_ntl - W~ c_tgt + eta (W c_ntl - W c_tgt) ||^2`` on target and neutral prompts filled into
  the same random template;
- anchoring: ``lambda_anc || W~ c_anc - W c_anc ||^2`` on mixed pairs of anchor prompts (generic words and the
  vocabulary's concepts nearest the target) with a little noise, and the empty prompt;
- adversarial stages: after each erase stage, embeddings ``delta`` are learned (ResAG frozen) that make
  ``W~(c_tgt + delta)`` match ``W c_tgt``; the next stage erases ``c_tgt + delta`` too.

Each concept's ResAG is its own ``term-<concept>.safetensors``; loading a run wraps ``to_k``/``to_v`` with
forward hooks (``apply_resags_of``), whose residual is computed once per prompt (the gate depends only on the
text) and reused at every denoising step.
"""
import contextlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm.erasure.runs import read_term, save_term, term_files
from ldm.erasure.trainer import ErasureTrainer
from ldm.paths import REPO_ROOT, resolve_path
from ldm.util import UsageError

DEFAULT_ANCHOR_WORDS = REPO_ROOT / "data" / "cpe-anchor-words.txt"
# The public code's artist setting (SD v1); a model config may carry its own (``cpe_defaults:``).
CPE_ORIGINAL_DEFAULTS = {"iterations": 450, "first_stage_factor": 4, "lr": 3e-5, "first_stage_lr_factor": 10.0,
                         "stages": 10, "adv_embeddings": 16, "adv_lr": 1e-2, "eta": 0.5, "anchor_weight": 1e4,
                         "anchor_batch": 16, "nearest_anchors": 50, "rank": 1, "gate_rank": 16, "alpha": 1.0,
                         "neutral": "real photograph", "prompt_templates": None, "warmup": 5}


def is_gated_projection(name):
    """The projections a ResAG wraps: ``to_k`` and ``to_v`` of every cross-attention layer (module names)."""
    return name.endswith("attn2.to_k") or name.endswith("attn2.to_v")


def gated_projections(unet):
    """``{name: nn.Linear}`` of the projections a ResAG wraps, in the UNet's order."""
    layers = {n: m for n, m in unet.named_modules() if is_gated_projection(n)}
    if not layers:
        raise UsageError("this UNet has no cross-attention to_k/to_v layers (attn2.to_k, attn2.to_v); CPE wraps those")
    return layers


# ---- the ResAG as pure functions of its tensors ----

def gate(E, U1, U2, v):
    """The shared gate on text embeddings ``E`` (batch, tokens, width): ``(g * Ebar, g)`` with
    ``Ebar = softmax(E U1 (E U2)^T / sqrt(r_gate)) E`` and ``g = sigmoid(Ebar v)`` per token."""
    Q, K = E @ U1, E @ U2
    P = torch.softmax(Q @ K.transpose(-1, -2) / math.sqrt(U1.shape[-1]), dim=-1)
    E_bar = P @ E
    g = torch.sigmoid(E_bar @ v)
    return g.unsqueeze(-1) * E_bar, g


def layer_residual(gated, A, B, scale):
    """One layer's residual ``(g * Ebar) A B scale``."""
    return (gated @ A) @ B * scale


def select_by_gate(gates, residuals):
    """Each token's residual from the concept whose gate is highest on it: ``gates`` (concepts, batch,
    tokens), ``residuals`` (concepts, batch, tokens, out)."""
    if len(residuals) == 1:
        return residuals[0]
    best = torch.stack(list(gates)).argmax(dim=0)  # (batch, tokens)
    stacked = torch.stack(list(residuals))
    return torch.gather(stacked, 0, best[None, ..., None].expand(1, *stacked.shape[1:]))[0]


class ResAG:
    """One concept's ResAG: gate tensors ``U1``, ``U2`` (width x gate_rank), ``v`` (width), and per wrapped
    layer ``A`` (width x rank) and ``B`` (rank x out), ``B`` and ``v`` zero."""

    def __init__(self, concept, tensors, rank, gate_rank, alpha):
        self.concept, self.tensors = concept, tensors
        self.rank, self.gate_rank, self.alpha = rank, gate_rank, alpha
        self.scale = alpha / rank

    @classmethod
    def new(cls, concept, layers, width, rank, gate_rank, alpha, generator, device="cpu"):
        """A fresh ResAG for ``layers`` (name -> nn.Linear): changes nothing until trained. ``U1``/``U2``
        start small (std 1/width) so that attention starts near mean-pooling yet has a gradient (the
        public code's 1/width^2-scaled start barely moves)."""
        def randn(*shape, std):
            return (torch.randn(*shape, generator=generator) * std).to(device)
        tensors = {"U1": randn(width, gate_rank, std=1 / width), "U2": randn(width, gate_rank, std=1 / width),
                   "v": torch.zeros(width, device=device)}
        for name, layer in layers.items():
            tensors[f"A.{name}"] = randn(width, rank, std=1 / math.sqrt(width))
            tensors[f"B.{name}"] = torch.zeros(rank, layer.out_features, device=device)
        return cls(concept, tensors, rank, gate_rank, alpha)

    @property
    def width(self):
        return self.tensors["U1"].shape[0]

    def gate(self, E):
        return gate(E, self.tensors["U1"], self.tensors["U2"], self.tensors["v"])

    def residual(self, gated, layer):
        return layer_residual(gated, self.tensors[f"A.{layer}"], self.tensors[f"B.{layer}"], self.scale)


def residuals(resags, E, layers):
    """``{layer: residual}`` of several concepts' ResAGs on ``E``, each token taking the concept with the
    highest gate."""
    gates = [resag.gate(E) for resag in resags]
    return {layer: select_by_gate([g for _, g in gates], [r.residual(gated, layer) for r, (gated, _) in zip(resags, gates)])
            for layer in layers}


# ---- loading: ResAGs as forward hooks on to_k / to_v ----

class ResAGHooks:
    """Several concepts' ResAGs wrapped around ``layers`` (CompVis name -> the ``to_k``/``to_v`` module, ours
    or diffusers') by forward hooks (the weights and their names stay the base's). The residuals are computed once per distinct text context and reused
    while the context repeats (every denoising step of a prompt); ``computations`` counts them."""

    def __init__(self, layers, resags):
        self.resags, self.layers = list(resags), dict(layers)
        for resag in self.resags:
            check_compatible(resag, self.layers)
        self.computations, self._context, self._residuals = 0, None, {}
        self._input, self._input_version = None, None
        self.handles = [module.register_forward_hook(self._hook(name)) for name, module in self.layers.items()]

    def _hook(self, name):
        def add_residual(module, inputs, output):
            return output + self.residual_of(inputs[0])[name].to(output.dtype)
        return add_residual

    @torch.no_grad()
    def residual_of(self, context):
        if context is self._input and context._version == self._input_version:
            return self._residuals  # every wrapped layer of one UNet call sees the same, unchanged tensor
        same = (self._context is not None and self._context.shape == context.shape
                and self._context.device == context.device and torch.equal(self._context, context))
        self._input, self._input_version = context, context._version
        if not same:
            self._context = context.detach().clone()
            self._residuals = residuals(self.resags, context.float(), self.layers)
            self.computations += 1
        return self._residuals

    def remove(self):
        """Unwrap: the UNet is the base model again."""
        for handle in self.handles:
            handle.remove()
        self.handles = []


def check_compatible(resag, layers):
    """A ResAG trained on another model (text width or layers) is a one-line error."""
    width = next(iter(layers.values())).in_features
    if resag.width != width:
        raise UsageError(f"ResAG '{resag.concept}' is for a {resag.width}-wide text encoder; this model's is "
                         f"{width}-wide: it was trained on another base model")
    for name, layer in layers.items():
        A, B = resag.tensors.get(f"A.{name}"), resag.tensors.get(f"B.{name}")
        if A is None or B is None or B.shape[1] != layer.out_features:
            raise UsageError(f"ResAG '{resag.concept}' has no matching weights for layer '{name}': it was trained "
                             "on another base model")


def read_resags(run_dir):
    """The ResAGs of a run folder (one term file per concept)."""
    resags = []
    for path in term_files(run_dir):
        tensors, metadata = read_term(path)
        resags.append(ResAG(metadata["concept"], tensors, int(metadata["rank"]), int(metadata["gate_rank"]),
                            float(metadata["alpha"])))
    return resags


def move_to(resags, device):
    """Put every ResAG's tensors on ``device`` in float32 (the projections' inputs are cast to it too)."""
    for resag in resags:
        resag.tensors = {k: v.float().to(device) for k, v in resag.tensors.items()}


def apply_resags(model, resags):
    """Wrap ``model``'s UNet with ``resags``; returns the hooks (``model.resag_hooks`` too)."""
    unet = model.model.diffusion_model
    old = getattr(model, "resag_hooks", None)
    if old is not None:
        old.remove()
    move_to(resags, next(unet.parameters()).device)
    model.resag_hooks = ResAGHooks(gated_projections(unet), resags) if resags else None
    return model.resag_hooks


def apply_resags_of(model, run_dir):
    """The CPE edit of a run folder (``ldm.erasure.runs.EDITS``): its ResAGs wrapped around the base."""
    apply_resags(model, read_resags(run_dir))
    return model


def _natural_key(name, groups):
    parts = name.split(".")
    return (groups.index(parts[0]), [int(p) if p.isdigit() else p for p in parts[1:]])


def diffusers_layers(unet):
    """A diffusers ``UNet2DConditionModel``'s cross-attention ``to_k``/``to_v`` modules under their CompVis
    names: both UNets hold them in the same order (down/input, mid/middle, up/output blocks)."""
    theirs = {n: m for n, m in unet.named_modules() if n.endswith("attn2.to_k") or n.endswith("attn2.to_v")}
    return sorted(theirs.items(), key=lambda item: _natural_key(item[0], ["down_blocks", "mid_block", "up_blocks"]))


def apply_to_diffusers(pipeline, run_dir):
    """Wrap a converted ``StableDiffusionPipeline`` (or its ``unet``) with a CPE run's ResAGs, as our ``ldm``
    loads the run: ``apply_to_diffusers(pipe, "models/cpe-word_VanGogh")``; ``.remove()`` unwraps.
    A pipeline of another base model (layer count or widths) is a one-line error."""
    unet = getattr(pipeline, "unet", pipeline)
    resags = read_resags(run_dir)
    if not resags:
        raise UsageError(f"run '{Path(run_dir).name}' has no ResAG (term-*.safetensors); it is not a CPE run")
    ours = sorted({k[2:] for k in resags[0].tensors if k.startswith("A.")},
                  key=lambda n: _natural_key(n, ["input_blocks", "middle_block", "output_blocks"]))
    theirs = diffusers_layers(unet)
    if len(ours) != len(theirs):
        raise UsageError(f"run '{Path(run_dir).name}' wraps {len(ours)} projections; this UNet has {len(theirs)} "
                         "cross-attention to_k/to_v: it is not the run's base model")
    move_to(resags, next(unet.parameters()).device)
    return ResAGHooks({name: module for name, (_, module) in zip(ours, theirs)}, resags)


# ---- training ----

def lipschitz_weights(unet, layers, tokens):
    """Per wrapped layer, the weight of its squared error: ``to_k``: sigma(W_o W_v) sigma(W_q) / tokens,
    ``to_v``: sigma(W_o) (the attention block's own weights)."""
    modules = dict(unet.named_modules())
    weights = {}
    with torch.no_grad():
        for name in layers:
            attention = modules[name.rsplit(".", 1)[0]]
            W_o, W_v, W_q = (attention.to_out[0].weight.float(), attention.to_v.weight.float(),
                             attention.to_q.weight.float())
            if name.endswith("to_k"):
                weights[name] = float(torch.linalg.matrix_norm(W_o @ W_v, 2) * torch.linalg.matrix_norm(W_q, 2)) / tokens
            else:
                weights[name] = float(torch.linalg.matrix_norm(W_o, 2))
    return weights


def read_words(path):
    """Words or prompts from a text file, one a line; blank lines and ``#`` comments skipped."""
    path = resolve_path(path)
    if not path.is_file():
        raise UsageError(f"'{path}' does not exist; give a text file with one entry a line")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.strip().startswith("#")]


def default_vocabulary(concept):
    """tiny-sd's anchor vocabulary: every other concept of every attribute (styles as prompts name them)."""
    from ldm.data.prompt_sets import all_concepts
    from ldm.text_geometry import concept_text
    return [concept_text(c) for c in all_concepts() if c != concept]


@torch.no_grad()
def nearest_concepts(model, concept, vocabulary, k):
    """The ``k`` entries of ``vocabulary`` whose text embedding (all tokens, flattened) is nearest the
    concept's by cosine; entries containing the concept's name are left out."""
    candidates = [w for w in dict.fromkeys(vocabulary) if concept.lower() not in w.lower()]
    if not candidates or k <= 0:
        return []
    embeddings = model.get_learned_conditioning([concept, *candidates]).float().flatten(1)
    similarity = F.cosine_similarity(embeddings[:1], embeddings[1:])
    order = similarity.argsort(descending=True)[:k]
    return [candidates[i] for i in order.tolist()]


def choose_anchors(model, concept, anchors=None, words=(), vocabulary=None, nearest=50):
    """The anchors that keep concept ``concept``'s neighbours: ``anchors`` when the user names them, else the
    generic ``words`` plus the ``nearest`` entries of ``vocabulary`` (tiny-sd: its other concepts) closest
    to the concept by text embedding."""
    if anchors is not None:
        return list(dict.fromkeys(a.strip() for a in anchors if a.strip()))
    if vocabulary is None:
        from ldm.data.prompt_sets import all_concepts
        vocabulary = default_vocabulary(concept) if concept in all_concepts() else []
    chosen = [w for w in words if concept.lower() not in w.lower()]
    return list(dict.fromkeys(chosen + nearest_concepts(model, concept, vocabulary, nearest)))


@dataclass
class CPESettings:
    """Everything that determines a CPE run (recorded in the run's config.yaml)."""
    concepts: list
    anchors: list = field(default_factory=list)  # per concept: the anchor words it keeps
    neutral: str = "real photograph"
    templates: list = field(default_factory=lambda: ["{}"])
    eta: float = 0.5
    anchor_weight: float = 1e4
    anchor_batch: int = 16
    rank: int = 1
    gate_rank: int = 16
    alpha: float = 1.0
    stages: int = 10
    iterations: int = 450  # erase iterations of every stage after the first
    first_stage_factor: int = 4
    lr: float = 3e-5
    first_stage_lr_factor: float = 10.0
    warmup: int = 5
    adv_embeddings: int = 16
    adv_lr: float = 1e-2
    anchor_noise: float = 1e-3
    seed: int = 0

    def check(self):
        """Refuse contradictory settings with one line each."""
        if not self.concepts or not all(c.strip() for c in self.concepts):
            raise UsageError("--prompt names no concept; e.g. --prompt 'Van Gogh' or --prompt 'A,B' --seperator ','")
        if len(set(self.concepts)) != len(self.concepts):
            raise UsageError(f"--prompt names a concept twice: {self.concepts}")
        for concept, anchors in zip(self.concepts, self.anchors):
            inside = [a for a in anchors if a.strip().lower() == concept.strip().lower()]
            if inside:
                raise UsageError(f"the anchors of '{concept}' include '{inside[0]}' itself; an anchor is kept, the "
                                 "target erased: drop it from --anchors")
        if self.rank < 1 or self.gate_rank < 1:
            raise UsageError(f"--rank and --gate_rank must be >= 1, got {self.rank} and {self.gate_rank}")
        if self.stages < 1 or self.iterations < 1 or self.first_stage_factor < 1 or self.anchor_batch < 1:
            raise UsageError("--stages, --iterations, --first_stage_factor and --anchor_batch must be >= 1")
        if self.adv_embeddings < 0:
            raise UsageError("--adv_embeddings must be >= 0")
        for name in ("lr", "adv_lr", "alpha", "first_stage_lr_factor"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise UsageError(f"--{name} must be a positive number, got {value}")
        if not all(t.count("{}") == 1 for t in self.templates):
            raise UsageError("every prompt template must hold {} exactly once")
        return self

    def as_dict(self):
        return asdict(self)

    def stage_iterations(self, stage):
        return self.iterations * (self.first_stage_factor if stage == 0 else 1)

    def iterations_per_concept(self):
        return sum(self.stage_iterations(s) for s in range(self.stages))

    def total_iterations(self):
        return len(self.concepts) * self.iterations_per_concept()

    def position(self, iteration):
        """``(concept index, stage, iteration within the stage)`` of a global iteration (0-based)."""
        concept, rest = divmod(iteration, self.iterations_per_concept())
        for stage in range(self.stages):
            if rest < self.stage_iterations(stage):
                return concept, stage, rest
            rest -= self.stage_iterations(stage)
        raise IndexError(iteration)


def cosine_lr(base, step, total, warmup):
    """Linear warm-up then cosine decay to 0 (one cycle per stage, as the public code)."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class CPETrainer(ErasureTrainer):
    """CPE over a ``LatentDiffusion`` model: one ResAG per concept, trained one concept after another, stage
    by stage, on projection outputs only. ``step()`` is one erase iteration; an adversarial stage runs in
    ``after_step`` when an erase stage ends (not after the last)."""

    def __init__(self, model, settings, device="cpu", progress=True):
        self.settings = settings.check()
        self.model, self.unet = model, model.model.diffusion_model
        self.unet.requires_grad_(False)
        self.layers = gated_projections(self.unet)
        self.progress = progress
        generator = torch.Generator().manual_seed(settings.seed)
        width = next(iter(self.layers.values())).in_features
        self.resags = [ResAG.new(c, self.layers, width, settings.rank, settings.gate_rank, settings.alpha, generator,
                                 device) for c in settings.concepts]
        params = {f"{i}.{k}": t.requires_grad_(True) for i, r in enumerate(self.resags) for k, t in r.tensors.items()}
        super().__init__(params, settings.lr, settings.seed, device)
        self.tokens = model.cond_stage_model.max_length
        self.lipschitz = lipschitz_weights(self.unet, self.layers, self.tokens)
        self.empty = self.encode([""])
        self.deltas = [torch.zeros(0, self.tokens, width, device=device) for _ in self.resags]
        self.anchor_cache, self.prompt_cache = {}, {}
        self._optimizer_for = None

    @torch.no_grad()
    def encode(self, prompts, batch=64):
        """Text embeddings of ``prompts`` (float32, on the trainer's device), in batches."""
        return torch.cat([self.model.get_learned_conditioning(list(prompts[i:i + batch])).float()
                          for i in range(0, len(prompts), batch)]).to(self.device)

    # -- projections --
    def base_projection(self, E):
        """``{layer: W E}`` of the frozen projections."""
        return {n: F.linear(E, layer.weight.float()) for n, layer in self.layers.items()}

    def edited_projection(self, E, concept):
        """``{layer: W E + residual}`` with concept ``concept``'s ResAG."""
        gated, _ = self.resags[concept].gate(E)
        return {n: F.linear(E, layer.weight.float()) + self.resags[concept].residual(gated, n)
                for n, layer in self.layers.items()}

    def weighted_error(self, a, b):
        """``sum_l w_l mean((a_l - b_l)^2) / layers``."""
        return sum(self.lipschitz[n] * (a[n] - b[n]).pow(2).mean() for n in self.layers) / len(self.layers)

    # -- prompts --
    def target_and_neutral(self, concept):
        """The target and neutral prompts in one random template: their embeddings (1, tokens, width) each."""
        if concept not in self.prompt_cache:
            name, templates = self.settings.concepts[concept], self.settings.templates
            self.prompt_cache[concept] = (self.encode([t.replace("{}", name) for t in templates]),
                                          self.encode([t.replace("{}", self.settings.neutral) for t in templates]))
        targets, neutrals = self.prompt_cache[concept]
        i = self.randint(len(targets))
        return targets[i:i + 1], neutrals[i:i + 1]

    def anchors_of(self, concept):
        """Every anchor of concept ``concept`` filled into every template, encoded once."""
        if concept not in self.anchor_cache:
            prompts = [t.replace("{}", a) for a in self.settings.anchors[concept] for t in self.settings.templates]
            self.anchor_cache[concept] = self.encode(prompts) if prompts else self.empty[:0]
        return self.anchor_cache[concept]

    def anchor_batch(self, concept):
        """Mixed pairs of noised anchor embeddings (``lambda ~ U(0, 1)`` per pair), and ``""``."""
        pool = self.anchors_of(concept)
        if len(pool) == 0:
            return self.empty
        n = self.settings.anchor_batch
        picks = pool[torch.randint(0, len(pool), (2 * n,), generator=self.generator)]
        noise = torch.randn(picks.shape, generator=self.generator).to(picks.device)
        picks = picks + self.settings.anchor_noise * picks.flatten(1).norm(dim=1)[:, None, None] * noise
        lam = torch.rand(n, 1, 1, generator=self.generator).to(picks.device)
        return torch.cat([lam * picks[:n] + (1 - lam) * picks[n:], self.empty])

    # -- the loss of one erase iteration --
    def loss(self):
        concept, stage, step = self.settings.position(self.iteration)
        self._set_stage(concept, stage, step)
        E_t, E_n = self.target_and_neutral(concept)
        base_t, base_n = self.base_projection(E_t), self.base_projection(E_n)
        target = {n: base_n[n] + self.settings.eta * (base_n[n] - base_t[n]) for n in self.layers}
        loss = self.weighted_error(self.edited_projection(E_t, concept), target)
        deltas = self.deltas[concept]
        if len(deltas):
            attacked = self.edited_projection(E_t + deltas, concept)
            loss = loss + self.weighted_error(attacked, {n: v.expand_as(attacked[n]) for n, v in target.items()})
        anchors = self.anchor_batch(concept)
        loss = loss + self.settings.anchor_weight * self.weighted_error(self.edited_projection(anchors, concept),
                                                                         self.base_projection(anchors))
        return loss

    def _set_stage(self, concept, stage, step):
        """A fresh AdamW over the concept's ResAG at each stage's start; the lr follows the stage's schedule."""
        if self._optimizer_for != (concept, stage):
            params = [p for k, p in self.params.items() if k.startswith(f"{concept}.")]
            lr = self.settings.lr * (self.settings.first_stage_lr_factor if stage == 0 else 1)
            self.optimizer = torch.optim.AdamW(params, lr=lr)
            self._optimizer_for, self._stage_lr = (concept, stage), lr
        for group in self.optimizer.param_groups:
            group["lr"] = cosine_lr(self._stage_lr, step, self.settings.stage_iterations(stage), self.settings.warmup)

    def after_step(self, loss):
        concept, stage, step = self.settings.position(self.iteration - 1)
        last_of_stage = step == self.settings.stage_iterations(stage) - 1
        if last_of_stage and stage < self.settings.stages - 1 and self.settings.adv_embeddings > 0:
            self.deltas[concept] = self.adversarial_embeddings(concept, self.settings.stage_iterations(stage))

    def adversarial_embeddings(self, concept, iterations):
        """``adv_embeddings`` additive embeddings that bring back the target's original projections through
        the frozen ResAG: minimise ``|| W~(c_tgt + delta) - W c_tgt ||^2`` (AdamW, cosine schedule)."""
        from tqdm.auto import tqdm
        s = self.settings
        deltas = (torch.randn(s.adv_embeddings, self.tokens, self.empty.shape[-1], generator=self.generator)
                  / self.empty.shape[-1] ** 2).to(self.device).requires_grad_(True)
        optimizer = torch.optim.AdamW([deltas], lr=s.adv_lr)
        for tensor in self.resags[concept].tensors.values():
            tensor.requires_grad_(False)
        for step in tqdm(range(iterations), desc=f"adversarial embeddings ({s.concepts[concept]})", leave=False,
                         disable=not self.progress):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(s.adv_lr, step, iterations, s.warmup)
            E_t, _ = self.target_and_neutral(concept)
            base = self.base_projection(E_t)
            attacked = self.edited_projection(E_t + deltas, concept)
            loss = self.weighted_error(attacked, {n: v.expand_as(attacked[n]) for n, v in base.items()})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        for tensor in self.resags[concept].tensors.values():
            tensor.requires_grad_(True)
        return deltas.detach()

    # -- state, outputs --
    def extra_state(self):
        return {"deltas": [d.cpu() for d in self.deltas]}

    def load_extra_state(self, state):
        self.deltas = [d.to(self.device) for d in state["deltas"]]

    def state_dict(self):
        state = super().state_dict()
        state["optimizer_for"] = list(self._optimizer_for or [])
        return state

    def load_state_dict(self, state):
        if state["iteration"] < self.settings.total_iterations() and state.get("optimizer_for"):
            concept, stage = state["optimizer_for"]
            self._optimizer_for = None
            self._set_stage(concept, stage, 0)  # the optimizer whose state the checkpoint holds
        super().load_state_dict(state)

    def summary(self):
        return {"concepts": list(self.settings.concepts), "anchors": [len(a) for a in self.settings.anchors],
                "stages": self.settings.stages, "layers": len(self.layers),
                "adversarial_embeddings": [int(len(d)) for d in self.deltas]}

    def save_edit(self, run_dir, metadata):
        """One ``term-<concept>.safetensors`` per concept: its gate and per-layer A, B."""
        s = self.settings
        for resag in self.resags:
            save_term(run_dir, resag.concept, {k: v.detach().cpu() for k, v in resag.tensors.items()},
                      {**metadata, "rank": s.rank, "gate_rank": s.gate_rank, "alpha": s.alpha,
                       "text_width": resag.width, "anchors": json.dumps(s.anchors[s.concepts.index(resag.concept)])})

    def edited_model(self):
        """The model with every trained ResAG wrapped around it (wrapped anew when unwrapped)."""
        hooks = getattr(self.model, "resag_hooks", None)
        if hooks is not None and hooks.handles:
            return self.model
        apply_resags(self.model, [ResAG(r.concept, {k: v.detach() for k, v in r.tensors.items()}, r.rank,
                                        r.gate_rank, r.alpha) for r in self.resags])
        return self.model

    def base_values(self):
        return {}  # CPE changes no UNet parameter; its edit is the hooks

    @contextlib.contextmanager
    def without_edit(self):
        hooks = self.edited_model().resag_hooks
        hooks.remove()
        try:
            yield
        finally:
            self.edited_model()
