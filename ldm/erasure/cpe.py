"""CPE: Concept Pinpoint Eraser with Residual Attention Gates (Lee et al., ICLR 2025): training.

A ResAG (``ldm.erasure.cpe_gates``) is added to every cross-attention ``to_k`` and ``to_v``. Training never
runs the UNet: every loss compares ``to_k``/``to_v`` outputs on text embeddings, each layer's squared error
weighted by its Lipschitz estimate (``to_k``: sigma(W_o W_v) sigma(W_q) / tokens, ``to_v``: sigma(W_o)):

- erase: ``|| W c_ntl - W~ c_tgt + eta (W c_ntl - W c_tgt) ||^2`` on target and neutral prompts filled into
  the same random template;
- anchoring: ``lambda_anc || W~ c_anc - W c_anc ||^2`` on mixed pairs of anchor prompts (generic words and the
  vocabulary's concepts nearest the target) with a little noise, and the empty prompt;
- adversarial stages: after each erase stage, embeddings ``delta`` are learned (ResAG frozen) that make
  ``W~(c_tgt + delta)`` match ``W c_tgt``; the next stage erases ``c_tgt + delta`` too.

The public code builds the gate's ``K`` from ``U1`` too (``U2`` never trains); here ``K = E U2``, as the
paper writes. Each concept's ResAG is its own ``term-<concept>.safetensors``.
"""
import contextlib
import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ldm.data.prompt_sets import all_concepts
from ldm.erasure.cpe_gates import ResAG, apply_resags, gated_projections
from ldm.erasure.esd import DEFAULT_PROMPT_TEMPLATES, concept_words, read_prompt_templates
from ldm.erasure.settings import MethodSettings, setting
from ldm.erasure.trainer import ErasureTrainer
from ldm.paths import resolve_path
from ldm.runs import save_term
from ldm.text_geometry import concept_text
from ldm.util import UsageError, check_at_least, check_positive

DEFAULT_ANCHOR_WORDS = "data/cpe-anchor-words.txt"


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
        vocabulary = default_vocabulary(concept) if concept in all_concepts() else []
    chosen = [w for w in words if concept.lower() not in w.lower()]
    return list(dict.fromkeys(chosen + nearest_concepts(model, concept, vocabulary, nearest)))


def anchors_for(model, settings):
    """Per concept of ``settings`` (``CPESettings``), the anchors it keeps (``choose_anchors``)."""
    generic = read_words(settings.anchor_words) if settings.anchor_words else []
    vocabulary = read_words(settings.anchor_vocab) if settings.anchor_vocab else None
    return [choose_anchors(model, concept, settings.listed_anchors(), generic, vocabulary, settings.nearest_anchors)
            for concept in settings.concepts()]


@dataclass
class CPESettings(MethodSettings):
    """Everything that determines a CPE run (recorded in the run's config.yaml). Defaults: the public code's
    artist setting (SD v1); tiny-sd's config sets its own (``cpe_defaults:``)."""
    prompt: str = setting(None, "the concept(s) to erase, e.g. 'Van Gogh'", required=True, config=False)
    seperator: str = setting(None, "split --prompt on this (one ResAG each)", config=False, aliases=("separator",))
    anchors: str = setting(None, "comma-separated anchors to keep, instead of the generic words and nearest "
                                 "vocabulary entries", config=False)
    anchor_words: str = setting(DEFAULT_ANCHOR_WORDS, "generic anchors, one a line", metavar="FILE")
    anchor_vocab: str = setting(None, "file of concepts to pick the nearest anchors from (none for a tiny-sd "
                                      "concept: its other concepts)", metavar="FILE")
    nearest_anchors: int = setting(50, "vocabulary entries nearest the target kept as anchors")
    neutral: str = setting("real photograph", "the surrogate the target maps to in each template")
    prompt_templates: str = setting(DEFAULT_PROMPT_TEMPLATES, "phrasings target, neutral and anchors are filled "
                                    "into, one a line with {} (none: the bare words)", metavar="FILE")
    eta: float = setting(0.5, "eta of the erase target W c_ntl + eta (W c_ntl - W c_tgt)")
    anchor_weight: float = setting(1e4, "lambda_anc, the anchoring loss's weight")
    anchor_batch: int = setting(16, "mixed anchors per step")
    rank: int = setting(1, "rank of A_l B_l (1 styles/names, 4 explicit content)")
    gate_rank: int = setting(16, "rank of U1, U2 (16 styles/names, 64 explicit content)")
    alpha: float = setting(1.0, "the residual's scale is alpha / rank")
    stages: int = setting(10, "erase stages, an adversarial stage between each two (1: none)")
    iterations: int = setting(450, "erase iterations per stage after the first")
    first_stage_factor: int = setting(4, "the first stage runs this many times --iterations")
    lr: float = setting(3e-5, "AdamW's lr after the first stage")
    first_stage_lr_factor: float = setting(10.0, "the first stage's lr is this times --lr")
    warmup: int = setting(5, "warm-up iterations of each stage's cosine schedule")
    adv_embeddings: int = setting(16, "adversarial embeddings learned per adversarial stage")
    adv_lr: float = setting(1e-2, "their AdamW lr")
    anchor_noise: float = setting(1e-3, "noise added to anchor embeddings, relative to their norm")
    seed: int = setting(0, "seed of every random draw of the run", config=False)

    def concepts(self):
        """The concepts to erase, one ResAG each."""
        return concept_words(self.prompt, self.seperator)

    def templates(self):
        """The phrasing templates (``["{}"]`` without a file)."""
        if self.prompt_templates is None or str(self.prompt_templates).strip().lower() == "none":
            return ["{}"]
        return read_prompt_templates(self.prompt_templates)

    def listed_anchors(self):
        """``--anchors`` as a list, or None when the anchors are chosen."""
        return [a for a in self.anchors.split(",")] if self.anchors is not None else None

    def check(self):
        """Refuse bad or contradictory settings with one line each."""
        concepts = self.concepts()
        if len(set(concepts)) != len(concepts):
            raise UsageError(f"--prompt names a concept twice: {concepts}")
        for concept in concepts:
            inside = [a for a in self.listed_anchors() or [] if a.strip().lower() == concept.strip().lower()]
            if inside:
                raise UsageError(f"the anchors of '{concept}' include '{inside[0]}' itself; an anchor is kept, the "
                                 "target erased: drop it from --anchors")
        check_at_least(self, 1, "rank", "gate_rank", "stages", "iterations", "first_stage_factor", "anchor_batch")
        check_at_least(self, 0, "adv_embeddings", "nearest_anchors", "warmup", "anchor_noise", "eta", "anchor_weight")
        check_positive(self, "lr", "adv_lr", "alpha", "first_stage_lr_factor")
        self.templates()
        return self

    def stage_iterations(self, stage):
        return self.iterations * (self.first_stage_factor if stage == 0 else 1)

    def iterations_per_concept(self):
        return sum(self.stage_iterations(s) for s in range(self.stages))

    def total_iterations(self):
        return len(self.concepts()) * self.iterations_per_concept()

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

    def __init__(self, model, settings, anchors, device="cpu", progress=True):
        self.settings = settings.check()
        self.concepts, self.templates, self.anchors = settings.concepts(), settings.templates(), anchors
        self.model, self.unet = model, model.model.diffusion_model
        self.unet.requires_grad_(False)
        self.layers = gated_projections(self.unet)
        self.progress = progress
        generator = torch.Generator().manual_seed(settings.seed)
        width = next(iter(self.layers.values())).in_features
        self.resags = [ResAG.new(c, self.layers, width, settings.rank, settings.gate_rank, settings.alpha, generator,
                                 device) for c in self.concepts]
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
            name, templates = self.concepts[concept], self.templates
            self.prompt_cache[concept] = (self.encode([t.replace("{}", name) for t in templates]),
                                          self.encode([t.replace("{}", self.settings.neutral) for t in templates]))
        targets, neutrals = self.prompt_cache[concept]
        i = self.randint(len(targets))
        return targets[i:i + 1], neutrals[i:i + 1]

    def anchors_of(self, concept):
        """Every anchor of concept ``concept`` filled into every template, encoded once."""
        if concept not in self.anchor_cache:
            prompts = [t.replace("{}", a) for a in self.anchors[concept] for t in self.templates]
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
        s = self.settings
        deltas = (torch.randn(s.adv_embeddings, self.tokens, self.empty.shape[-1], generator=self.generator)
                  / self.empty.shape[-1] ** 2).to(self.device).requires_grad_(True)
        optimizer = torch.optim.AdamW([deltas], lr=s.adv_lr)
        for tensor in self.resags[concept].tensors.values():
            tensor.requires_grad_(False)
        for step in tqdm(range(iterations), desc=f"adversarial embeddings ({self.concepts[concept]})", leave=False,
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

    def total_iterations(self):
        return self.settings.total_iterations()

    def describe(self):
        return [f"CPE '{word}': {len(kept)} anchors ({', '.join(kept[:8])}{', ...' if len(kept) > 8 else ''})"
                for word, kept in zip(self.concepts, self.anchors)]

    def record(self):
        return {"anchors": [list(kept) for kept in self.anchors]}

    def summary(self):
        return {"concepts": list(self.concepts), "anchors": [len(a) for a in self.anchors],
                "stages": self.settings.stages, "layers": len(self.layers),
                "adversarial_embeddings": [int(len(d)) for d in self.deltas]}

    def save_edit(self, run_dir, metadata):
        """One ``term-<concept>.safetensors`` per concept: its gate and per-layer A, B."""
        s = self.settings
        for resag in self.resags:
            save_term(run_dir, resag.concept, {k: v.detach().cpu() for k, v in resag.tensors.items()},
                      {**metadata, "rank": s.rank, "gate_rank": s.gate_rank, "alpha": s.alpha,
                       "text_width": resag.width, "anchors": json.dumps(self.anchors[self.concepts.index(resag.concept)])})

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
