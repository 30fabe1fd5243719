"""CPE: Concept Pinpoint Eraser with Residual Attention Gates (Lee et al., ICLR 2025): training.

A ResAG (``ldm.erasure.cpe_gates``) is added to every cross-attention ``to_k`` and ``to_v``. Training never
runs the UNet: every loss compares ``to_k``/``to_v`` outputs on text embeddings, each layer's squared error
weighted by its Lipschitz estimate (``to_k``: sigma(W_o W_v) sigma(W_q) / tokens, ``to_v``: sigma(W_o)):

- erase: ``|| W c_ntl - W~ c_tgt + eta (W c_ntl - W c_tgt) ||^2`` on target and neutral filled into the same
  random training sentence (``ldm.erasure.cpe_prompts``);
- anchoring: ``lambda_anc || W~ c_anc - W c_anc ||^2`` on mixed pairs of anchor sentences (the target's own
  domain and generic words, filled into the same sentences) with a little noise, and the empty prompt;
- adversarial stages: after each erase stage, embeddings ``delta`` are learned (ResAG frozen) that make
  ``W~(c_tgt + delta)`` match ``W c_tgt``; the next stage erases ``c_tgt + delta`` too.

Every such output is ``W y + z B`` (``y`` in the text space, ``z B`` the residual), so the weighted error of
all layers at once is a quadratic form in width x width Gram matrices (``ldm.erasure.cpe_geometry``): the
projections' outputs (about 25,000 columns on SD v1) are never formed, and each ResAG trains as five tensors.

The public code builds the gate's ``K`` from ``U1`` too (``U2`` never trains); here ``K = E U2``, as the
paper writes. Each concept's ResAG is its own ``term-<concept>.safetensors``.
"""
import contextlib
import json
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ldm.erasure.cpe_gates import COMBINATIONS, ResAG, apply_resags, gate_coordinates, gated_projections
from ldm.erasure.cpe_geometry import ProjectionGeometry, lipschitz_weights
from ldm.erasure.cpe_prompts import (ANCHOR_SCOPES, DEFAULT_ANCHOR_WORDS, DEFAULT_SENTENCES, fill, neutral_of,
                                     training_sentences)
from ldm.erasure.esd import concept_words
from ldm.erasure.settings import MethodSettings, setting
from ldm.erasure.trainer import ErasureTrainer
from ldm.runs import save_term
from ldm.util import UsageError, check_at_least, check_positive


@dataclass
class CPESettings(MethodSettings):
    """Everything that determines a CPE run (recorded in the run's config.yaml). Defaults: the public code's
    artist setting (SD v1); tiny-sd's config sets its own (``cpe_defaults:``)."""
    prompt: str = setting(None, "the concept(s) to erase, e.g. 'Van Gogh'", required=True, config=False)
    seperator: str = setting(None, "split --prompt on this (one ResAG each)", config=False, aliases=("separator",))
    anchors: str = setting(None, "comma-separated anchors to keep, instead of the domain and generic words",
                           config=False)
    anchor_words: str = setting(DEFAULT_ANCHOR_WORDS, "generic anchors, one a line; those sharing a training "
                                "sentence with the target are dropped", metavar="FILE")
    anchor_vocab: str = setting(None, "the target's domain, one entry a line (e.g. artist names); its "
                                      "--nearest_anchors entries nearest the target are anchors; concept-world: "
                                      "tiny-sd's own values (see --anchor_scope)", metavar="FILE")
    anchor_scope: str = setting("attribute", "with --anchor_vocab concept-world: the other values of the target's "
                                "attribute (as the public code: its own domain) or every other concept (ours before)",
                                choices=ANCHOR_SCOPES)
    nearest_anchors: int = setting(50, "domain entries nearest the target kept as anchors")
    neutral: str = setting("real photograph", "the surrogate the target maps to in each sentence; concept-world: "
                           "a tiny-sd style maps to its style 'none' (flat colors), an object or a color to the "
                           "empty word")
    prompt_templates: str = setting(DEFAULT_SENTENCES, "sentences target, neutral and anchors are filled into, one "
                                    "a line with {} (the bare word is always added); concept-world: a tiny-sd "
                                    "concept's caption shapes filled with other attributes' values; none: the bare "
                                    "word", metavar="FILE")
    eta: float = setting(0.5, "eta of the erase target W c_ntl + eta (W c_ntl - W c_tgt)")
    anchor_weight: float = setting(1e4, "lambda_anc, the anchoring loss's weight")
    anchor_batch: int = setting(16, "mixed anchors per step")
    rank: int = setting(1, "rank of A_l B_l (1 styles/names, 4 explicit content)")
    gate_rank: int = setting(16, "rank of U1, U2 (16 styles/names, 64 explicit content)")
    alpha: float = setting(1.0, "the residual's scale is alpha / rank")
    gate_temperature: float = setting(1.0, "temperature of the gate's softmax (the public code's 1; this "
                                      "project used sqrt(gate_rank) before)")
    gate_combination: str = setting("highest-gate", "how several concepts' residuals meet on a token: highest-gate "
                                    "(the public code: only the concept whose gate is highest) or sum (ours: every "
                                    "concept's gated residual)", choices=COMBINATIONS)
    gate_floor: float = setting(0.0, "ours, off by default: gates below this give no residual (trained straight-"
                                "through: a shut gate still learns), so prompts a concept's gate barely opens on "
                                "are exactly the base's")
    stages: int = setting(10, "erase stages, an adversarial stage between each two (1: none)")
    iterations: int = setting(450, "erase iterations per stage after the first")
    first_stage_factor: int = setting(4, "the first stage runs this many times --iterations")
    lr: float = setting(3e-5, "AdamW's lr after the first stage")
    first_stage_lr_factor: float = setting(10.0, "the first stage's lr is this times --lr")
    warmup: int = setting(5, "warm-up iterations of each stage's cosine schedule")
    adv_embeddings: int = setting(16, "adversarial embeddings learned per adversarial stage")
    adv_iterations: int = setting(450, "iterations of each adversarial stage")
    adv_lr: float = setting(1e-2, "their AdamW lr")
    anchor_noise: float = setting(1e-3, "noise added to anchor embeddings, relative to their norm")
    seed: int = setting(0, "seed of every random draw of the run", config=False)

    def concepts(self):
        """The concepts to erase, one ResAG each."""
        return concept_words(self.prompt, self.seperator)

    def sentences(self, concept):
        """The sentences ``concept`` is erased in, ``{}`` where it goes (``training_sentences``)."""
        return training_sentences(self.prompt_templates, concept)

    def neutral_for(self, concept):
        """The neutral ``concept`` maps to (``neutral_of``)."""
        return neutral_of(self.neutral, concept)

    def listed_anchors(self):
        """``--anchors`` as a list, or None when the anchors are chosen."""
        return [a for a in self.anchors.split(",")] if self.anchors is not None else None

    def check(self):
        """Refuse bad or contradictory settings with one line each."""
        super().check()
        concepts = self.concepts()
        if len(set(concepts)) != len(concepts):
            raise UsageError(f"--prompt names a concept twice: {concepts}")
        for concept in concepts:
            inside = [a for a in self.listed_anchors() or [] if a.strip().lower() == concept.strip().lower()]
            if inside:
                raise UsageError(f"the anchors of '{concept}' include '{inside[0]}' itself; an anchor is kept, the "
                                 "target erased: drop it from --anchors")
        check_at_least(self, 1, "rank", "gate_rank", "stages", "iterations", "first_stage_factor", "anchor_batch",
                       "adv_iterations")
        check_at_least(self, 0, "adv_embeddings", "nearest_anchors", "warmup", "anchor_noise", "eta", "anchor_weight")
        check_positive(self, "lr", "adv_lr", "alpha", "first_stage_lr_factor", "gate_temperature")
        if not 0 <= self.gate_floor < 1:
            raise UsageError(f"--gate_floor must be in [0, 1) (a gate is a sigmoid), got {self.gate_floor}")
        for concept in concepts:
            self.sentences(concept)
            self.neutral_for(concept)
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
        self.concepts, self.anchors = settings.concepts(), anchors
        self.sentences = [settings.sentences(c) for c in self.concepts]
        self.neutrals = [settings.neutral_for(c) for c in self.concepts]
        self.model, self.unet = model, model.model.diffusion_model
        self.unet.requires_grad_(False)
        self.layers = gated_projections(self.unet)
        self.progress = progress
        generator = torch.Generator().manual_seed(settings.seed)
        width = next(iter(self.layers.values())).in_features
        self.tokens = model.cond_stage_model.max_length
        self.lipschitz = lipschitz_weights(self.unet, self.layers, self.tokens)
        self.geometry = ProjectionGeometry(self.layers, self.lipschitz, device)
        fresh = [ResAG.new(c, self.layers, width, settings.rank, settings.gate_rank, settings.alpha, generator,
                           device, settings.gate_temperature, settings.gate_floor) for c in self.concepts]
        self.packed = [{k: t.requires_grad_(True) for k, t in self.geometry.pack(r.tensors).items()} for r in fresh]
        params = {f"{i}.{k}": t for i, packed in enumerate(self.packed) for k, t in packed.items()}
        super().__init__(params, settings.lr, settings.seed, device)
        self.empty = self.encode([""])
        self.deltas = [torch.zeros(0, self.tokens, width, device=device) for _ in self.concepts]
        self.anchor_cache, self.prompt_cache, self._delta_quadratic = {}, {}, {}
        self._optimizer_for = None

    @torch.no_grad()
    def encode(self, prompts, batch=64):
        """Text embeddings of ``prompts`` (float32, on the trainer's device), in batches."""
        return torch.cat([self.model.get_learned_conditioning(list(prompts[i:i + batch])).float()
                          for i in range(0, len(prompts), batch)]).to(self.device)

    @property
    def resags(self):
        """The ResAGs in training, their per-layer tensors views of the packed ones (edits reach them)."""
        s = self.settings
        return [ResAG(c, self.geometry.unpack(packed), s.rank, s.gate_rank, s.alpha, s.gate_temperature, s.gate_floor,
                      s.gate_combination) for c, packed in zip(self.concepts, self.packed)]

    def coordinates(self, packed, E):
        """The residual's coordinates ``(g * Ebar) A`` of ``E`` under a packed ResAG (``gate_coordinates``)."""
        s = self.settings
        return gate_coordinates(E, packed["U1"], packed["U2"], packed["v"], packed["A"], s.gate_temperature,
                                s.gate_floor)[0]

    # -- prompts --
    def target_and_neutral(self, concept):
        """The target and neutral in one random training sentence: their embeddings (1, tokens, width) each."""
        if concept not in self.prompt_cache:
            name, sentences = self.concepts[concept], self.sentences[concept]
            self.prompt_cache[concept] = (self.encode([fill(t, name) for t in sentences]),
                                          self.encode([fill(t, self.neutrals[concept]) for t in sentences]))
        targets, neutrals = self.prompt_cache[concept]
        i = self.randint(len(targets))
        return targets[i:i + 1], neutrals[i:i + 1]

    def anchors_of(self, concept):
        """Every anchor of concept ``concept`` filled into every training sentence, encoded once, and their norms."""
        if concept not in self.anchor_cache:
            prompts = list(dict.fromkeys(fill(t, a) for a in self.anchors[concept] for t in self.sentences[concept]))
            pool = self.encode(prompts) if prompts else self.empty[:0]
            self.anchor_cache[concept] = pool, pool.flatten(1).norm(dim=1)[:, None, None]
        return self.anchor_cache[concept]

    def anchor_batch(self, concept):
        """Mixed pairs of noised anchor embeddings (``lambda ~ U(0, 1)`` per pair), and ``""``."""
        pool, pool_norms = self.anchors_of(concept)
        if len(pool) == 0:
            return self.empty
        n = self.settings.anchor_batch
        index = torch.randint(0, len(pool), (2 * n,), generator=self.generator).to(pool.device)
        picks, norms = pool[index], pool_norms[index]
        lam = torch.rand(n, 1, 1, generator=self.generator).to(picks.device)
        # each pick noised by anchor_noise x its norm, then mixed: the same law as one draw of the mixed noise,
        # whose scale is sqrt(lam^2 |a|^2 + (1 - lam)^2 |b|^2) x anchor_noise (half the random numbers)
        scale = self.settings.anchor_noise * torch.sqrt((lam * norms[:n]) ** 2 + ((1 - lam) * norms[n:]) ** 2)
        noise = torch.randn(n, *picks.shape[1:], generator=self.generator).to(picks.device)
        return torch.cat([lam * picks[:n] + (1 - lam) * picks[n:] + scale * noise, self.empty])

    # -- the loss of one erase iteration --
    def loss(self):
        """Erase (and erase under the last adversarial embeddings) plus anchoring: the edited output minus
        its target is ``W y + residual`` with ``y = (1 + eta)(c_tgt - c_ntl) [+ delta]`` (0 for anchors)."""
        concept, stage, step = self.settings.position(self.iteration)
        self._set_stage(concept, stage, step)
        s, packed = self.settings, self.packed[concept]
        E_t, E_n = self.target_and_neutral(concept)
        deltas, anchors = self.deltas[concept], self.anchor_batch(concept)
        K, J = self.geometry.coupling(packed["B"], s.alpha / s.rank)
        z = self.coordinates(packed, torch.cat([E_t, E_t + deltas, anchors]))  # one batch: the gate is per sentence
        y = (1 + s.eta) * (E_t - E_n)
        u = y @ self.geometry.G
        yGy = (u * y).sum(-1)
        m, a = len(deltas), len(anchors)
        # (y + d) G (y + d) with d G d fixed for the stage: no (16 x tokens) x width^2 product a step
        shifted = yGy + 2 * (u * deltas).sum(-1) + self.delta_quadratic(concept) if m else yGy[:0]
        Y = torch.cat([y, y + deltas, torch.zeros_like(anchors)])
        weights = torch.cat([torch.ones(1), torch.full((m,), 1 / max(m, 1)), torch.full((a,), s.anchor_weight / a)])
        return self.geometry.error(Y, z, K, J, torch.cat([yGy, shifted, yGy.new_zeros(a, yGy.shape[-1])]),
                                   weights.to(z.device))

    def delta_quadratic(self, concept):
        """``d G d`` per row of the concept's adversarial embeddings, computed once per set of them."""
        deltas = self.deltas[concept]
        if self._delta_quadratic.get(concept, (None,))[0] is not deltas:
            with torch.no_grad():
                self._delta_quadratic[concept] = (deltas, self.geometry.quadratic(deltas))
        return self._delta_quadratic[concept][1]

    def _set_stage(self, concept, stage, step):
        """A fresh AdamW over the concept's ResAG at each stage's start; the lr follows the stage's schedule."""
        if self._optimizer_for != (concept, stage):
            params = [p for k, p in self.params.items() if k.startswith(f"{concept}.")]
            lr = self.settings.lr * (self.settings.first_stage_lr_factor if stage == 0 else 1)
            self.optimizer = torch.optim.AdamW(params, lr=lr, fused=True)
            self._optimizer_for, self._stage_lr = (concept, stage), lr
        for group in self.optimizer.param_groups:
            group["lr"] = cosine_lr(self._stage_lr, step, self.settings.stage_iterations(stage), self.settings.warmup)

    def after_step(self, loss):
        concept, stage, step = self.settings.position(self.iteration - 1)
        last_of_stage = step == self.settings.stage_iterations(stage) - 1
        if last_of_stage and stage < self.settings.stages - 1 and self.settings.adv_embeddings > 0:
            self.deltas[concept] = self.adversarial_embeddings(concept)

    def adversarial_embeddings(self, concept):
        """``adv_embeddings`` additive embeddings that bring back the target's original projections through
        the frozen ResAG: minimise ``|| W~(c_tgt + delta) - W c_tgt ||^2 = || W delta + residual ||^2`` for
        ``adv_iterations`` steps (AdamW, cosine schedule)."""
        s = self.settings
        deltas = (torch.randn(s.adv_embeddings, self.tokens, self.empty.shape[-1], generator=self.generator)
                  / self.empty.shape[-1] ** 2).to(self.device).requires_grad_(True)
        optimizer = torch.optim.AdamW([deltas], lr=s.adv_lr, fused=True)
        frozen = {k: t.detach() for k, t in self.packed[concept].items()}
        with torch.no_grad():
            K, J = self.geometry.coupling(frozen["B"], s.alpha / s.rank)
        for step in tqdm(range(s.adv_iterations), desc=f"adversarial embeddings ({self.concepts[concept]})",
                         leave=False, disable=not self.progress):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(s.adv_lr, step, s.adv_iterations, s.warmup)
            E_t, _ = self.target_and_neutral(concept)
            loss = self.geometry.error(deltas, self.coordinates(frozen, E_t + deltas), K, J)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
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
        return [f"CPE '{word}': {len(sentences)} training sentences, neutral '{neutral}', {len(kept)} anchors "
                f"({', '.join(kept[:8])}{', ...' if len(kept) > 8 else ''})"
                for word, sentences, neutral, kept in zip(self.concepts, self.sentences, self.neutrals, self.anchors)]

    def record(self):
        return {"anchors": [list(kept) for kept in self.anchors], "sentences": [list(s) for s in self.sentences],
                "neutrals": list(self.neutrals)}

    def summary(self):
        return {"concepts": list(self.concepts), "anchors": [len(a) for a in self.anchors],
                "stages": self.settings.stages, "layers": len(self.layers),
                "adversarial_embeddings": [int(len(d)) for d in self.deltas]}

    def save_edit(self, run_dir, metadata):
        """One ``term-<concept>.safetensors`` per concept: its gate and per-layer A, B."""
        s = self.settings
        for resag in self.resags:
            save_term(run_dir, resag.concept, {k: v.detach().cpu().contiguous() for k, v in resag.tensors.items()},
                      {**metadata, "rank": s.rank, "gate_rank": s.gate_rank, "alpha": s.alpha,
                       "gate_temperature": s.gate_temperature, "gate_floor": s.gate_floor,
                       "gate_combination": s.gate_combination, "text_width": resag.width,
                       "anchors": json.dumps(self.anchors[self.concepts.index(resag.concept)])})

    def edited_model(self):
        """The model with every trained ResAG wrapped around it (wrapped anew when unwrapped)."""
        hooks = getattr(self.model, "resag_hooks", None)
        if hooks is not None and hooks.handles:
            return self.model
        apply_resags(self.model, [r.detached() for r in self.resags])
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
