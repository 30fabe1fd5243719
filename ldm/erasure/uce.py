"""UCE: Unified Concept Editing (Gandikota et al., WACV 2024), erasure in closed form.

Every cross-attention ``to_k`` and ``to_v`` weight ``W`` is replaced by the minimiser of

    lamb ||W' - W||^2 + s_e sum_i ||W' c_i - W g_i||^2 + s_p sum_j ||W' c_j - W c_j||^2

where ``c_i`` is the text embedding of an erased concept's last token (the public code's index: the prompt's
token count minus 2, so the empty prompt gives the start token), ``g_i`` that of its guide and ``c_j`` that of a
preserved concept. The solution is ``W' = W N M^-1`` with ``N = lamb I + s_e sum g_i c_i^T + s_p sum c_j c_j^T``
and ``M = lamb I + s_e sum c_i c_i^T + s_p sum c_j c_j^T``: one ``T = N M^-1`` (width x width) serves every
layer, since each target is the old weight times a text vector. So a run stores, per erased concept, only its
text rows (``term-<concept>.safetensors``: the erased prompts' rows, their guides' rows and its preserved rows);
loading solves for ``T`` from the run's terms and folds ``W T`` into each weight. Dropping a term
(``restore-concept.py``) solves again without that concept; dropping every term gives the base model.

Departures from the public code (``trainscripts/uce_sd_erase.py``), each stated in docs/methods/uce.md: ``T`` is
solved once in float64 (the code inverts ``M`` in float32 once per layer: the same matrix, less exact); the
``concept-world`` guide and preserve set name tiny-sd's own words (its config sets the guide), the code's choices
stay the defaults for every other model.
"""
import json
from dataclasses import dataclass

import torch

from ldm.erasure.cpe_prompts import CONCEPT_WORLD, check_concept_world, fill, neutral_of
from ldm.erasure.esd import concept_words, read_prompt_templates
from ldm.erasure.settings import MethodSettings, setting
from ldm.erasure.trainer import ErasureTrainer
from ldm.runs import read_term, save_term, term_files
from ldm.text_geometry import protected_prompts
from ldm.util import UsageError

# the public code's --expand_prompts true: five phrasings per concept, by --concept_type
EXPANSIONS = {"art": ("painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}"),
              "object": ("image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}")}
DEFAULT_GUIDES = {"object": "", "art": "art"}  # the public code's guide when none is given


def is_uce_weight(name):
    """The weights UCE edits: ``to_k`` and ``to_v`` of every cross-attention layer."""
    return "attn2.to_k.weight" in name or "attn2.to_v.weight" in name


@dataclass
class UCESettings(MethodSettings):
    """Everything that determines a UCE edit. Defaults: the public code's (SD v1); tiny-sd's config sets its
    own (``uce_defaults:``)."""
    prompt: str = setting(None, "the concept(s) to erase, e.g. 'Van Gogh'", required=True, config=False)
    seperator: str = setting(None, "split --prompt, --guide and --preserve on this (the public code: ';'); "
                                   "without it --prompt is one concept and the lists split on ','", config=False,
                             aliases=("separator",))
    guide: str = setting(None, "what an erased concept maps to: one prompt for all or one per concept; "
                               "concept-world: a tiny-sd style to 'flat colors', an object or color to ''; "
                               "none: by --concept_type ('' for object, 'art' for art)")
    preserve: str = setting(None, "concepts whose outputs are held (a list); concept-world: the other values of each "
                                  "erased concept's attribute; none: nothing held")
    concept_type: str = setting("object", "the public code's --concept_type: the default guide and the phrasings "
                                          "of --expand_prompts true", choices=("object", "art"))
    expand_prompts: str = setting("false", "also edit the concept in phrasings: false; true (the public code's five "
                                           "per --concept_type: 'painting by {}', ...; 'image of {}', ...); or a "
                                           "file, one phrasing a line with {} where the concept goes (ours)",
                                  metavar="false|true|FILE")
    erase_scale: float = setting(1.0, "weight of mapping each erased concept to its guide")
    preserve_scale: float = setting(1.0, "weight of holding each preserved concept")
    lamb: float = setting(0.5, "weight of the old weights (lambda)")

    def concepts(self):
        """The concepts to erase, one term each."""
        return concept_words(self.prompt, self.seperator)

    def _split(self, text):
        return [w.strip() for w in str(text).split(self.seperator or ",")]

    def guides(self):
        """Per concept, its guide prompt."""
        concepts = self.concepts()
        if self.guide is None:
            return [DEFAULT_GUIDES[self.concept_type]] * len(concepts)
        if str(self.guide).strip().lower() == CONCEPT_WORLD:
            return [neutral_of(CONCEPT_WORLD, c) for c in concepts]
        guides = self._split(self.guide) if (self.seperator or ",") in str(self.guide) else [str(self.guide).strip()]
        if len(guides) == 1:
            return guides * len(concepts)
        if len(guides) != len(concepts):
            raise UsageError(f"--guide names {len(guides)} guides for {len(concepts)} concepts; give one guide for "
                             "all or one per concept, split as --prompt")
        return guides

    def preserved(self, concept):
        """The concepts ``concept``'s term holds (a concept-world set leaves out nothing: the solve drops any
        preserved concept that the run erases)."""
        if self.preserve is None or str(self.preserve).strip().lower() == "none":
            return []
        if str(self.preserve).strip().lower() == CONCEPT_WORLD:
            check_concept_world(concept, "--preserve")
            return protected_prompts(concept)[1:]
        return [p for p in self._split(self.preserve) if p]

    def check(self):
        """Refuse bad or contradictory settings with one line each."""
        super().check()
        concepts = self.concepts()
        if len(set(concepts)) != len(concepts):
            raise UsageError(f"--prompt names a concept twice: {concepts}")
        for concept, guide in zip(concepts, self.guides()):
            if guide.strip().lower() == concept.lower():
                raise UsageError(f"the guide of '{concept}' is the concept itself; map it to another concept "
                                 "(--guide), e.g. '' or a neutral word")
        if self.preserve is not None and str(self.preserve).strip().lower() not in ("none", CONCEPT_WORLD):
            both = [c for c in concepts if c.lower() in {p.lower() for p in self.preserved(c)}]
            if both:
                raise UsageError(f"'{both[0]}' is both erased and preserved; a concept cannot be both: drop it from "
                                 "--preserve")
        for name in ("erase_scale", "preserve_scale"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if not self.lamb > 0:
            raise UsageError(f"--lamb must be > 0 (it keeps the solve invertible), got {self.lamb}")
        self.phrasings()  # a missing or malformed phrasings file is one line now, before any model loads
        return self

    def phrasings(self):
        """The prompts a concept is edited in, ``{}`` where it goes: the bare word, then the expansion's, each cut
        after the concept (UCE edits a prompt's last token, so the concept must end it: "{}, detailed" is "{}")."""
        flag = str(self.expand_prompts).strip()
        extra = [] if flag.lower() == "false" else EXPANSIONS[self.concept_type] if flag.lower() == "true" else \
            read_prompt_templates(flag)
        return list(dict.fromkeys(["{}", *(" ".join(p.split("{}")[0].split() + ["{}"]) for p in extra)]))


@torch.no_grad()
def last_token_rows(model, prompts):
    """(len(prompts), width): each prompt's text embedding at its last token, as the public code picks it (the
    token count minus 2, BOS and EOS included: the start token for the empty prompt)."""
    tokenizer = getattr(model.cond_stage_model, "tokenizer", None)
    if tokenizer is None:
        raise UsageError("UCE needs a text encoder with a tokenizer (as SD v1's CLIP); this model's has none")
    context = model.get_learned_conditioning(list(prompts)).float()
    rows = []
    for i, prompt in enumerate(prompts):
        count = len(tokenizer(prompt, truncation=True, max_length=context.shape[1]).input_ids)
        rows.append(context[i, count - 2])
    return torch.stack(rows).cpu()


def build_terms(model, settings):
    """One term per erased concept: its edited prompts' and their guides' last-token rows, and the rows of the
    concepts it preserves (their bare words, as the public code), with the scales."""
    terms = []
    for concept, guide in zip(settings.concepts(), settings.guides()):
        erase = [fill(p, concept) for p in settings.phrasings()]
        guides = [fill(p, guide) for p in settings.phrasings()]
        preserve = settings.preserved(concept)
        terms.append({"concept": concept, "erase_prompts": erase, "guide_prompts": guides,
                      "preserve_prompts": preserve,
                      "erase": last_token_rows(model, erase), "guide": last_token_rows(model, guides),
                      "preserve": last_token_rows(model, preserve) if preserve else torch.zeros(0, 0),
                      "erase_scale": settings.erase_scale, "preserve_scale": settings.preserve_scale,
                      "lamb": settings.lamb})
    return terms


def save_terms(run_dir, terms, metadata):
    """Each term as ``term-<concept>.safetensors``: the rows as tensors, prompts and scales as metadata."""
    for term in terms:
        tensors = {"erase": term["erase"].contiguous(), "guide": term["guide"].contiguous()}
        if len(term["preserve_prompts"]):
            tensors["preserve"] = term["preserve"].contiguous()
        save_term(run_dir, term["concept"], tensors, {
            **metadata, **{k: json.dumps(term[k]) for k in ("erase_prompts", "guide_prompts", "preserve_prompts")},
            **{k: str(term[k]) for k in ("erase_scale", "preserve_scale", "lamb")}})


def read_terms(run_dir):
    """The UCE terms of a run folder, as ``build_terms`` makes them."""
    terms = []
    for path in term_files(run_dir):
        tensors, metadata = read_term(path)
        term = {"concept": metadata["concept"], "path": path, "erase": tensors["erase"], "guide": tensors["guide"],
                "preserve": tensors.get("preserve", torch.zeros(0, 0)),
                **{k: json.loads(metadata.get(k, "[]")) for k in ("erase_prompts", "guide_prompts", "preserve_prompts")},
                **{k: float(metadata[k]) for k in ("erase_scale", "preserve_scale", "lamb")}}
        terms.append(term)
    return terms


def solve_transform(terms, width):
    """``T = N M^-1`` (width x width, float64) for the terms together; ``None`` for no terms (the base model).
    A preserved concept that another term erases is left out (after a restore it is held again); preserved
    prompts are counted once."""
    if not terms:
        return None
    lambs = {t["lamb"] for t in terms}
    if len(lambs) != 1:
        raise UsageError(f"the run's terms were made with different --lamb values ({sorted(lambs)}); UCE solves them "
                         "together, with one lambda")
    erased = {t["concept"].strip().lower() for t in terms}
    N = M = lambs.pop() * torch.eye(width, dtype=torch.float64)
    held = set()
    for t in terms:
        C, G = t["erase"].double(), t["guide"].double()
        if C.shape[1] != width:
            raise UsageError(f"term '{t['concept']}' ({t['path'] if 'path' in t else 'new'}) has {C.shape[1]}-wide text "
                             f"rows; this model's text is {width} wide: it was made on another base model")
        N, M = N + t["erase_scale"] * G.T @ C, M + t["erase_scale"] * C.T @ C
        for row, prompt in zip(t["preserve"].double(), t["preserve_prompts"]):
            if prompt.strip().lower() in erased or prompt in held:
                continue
            held.add(prompt)
            outer = t["preserve_scale"] * torch.outer(row, row)
            N, M = N + outer, M + outer
    return torch.linalg.solve(M.T, N.T).T  # N M^-1, without forming the inverse


def uce_weights(unet):
    """The UNet's cross-attention ``to_k``/``to_v`` weights (name -> parameter); none is one line."""
    weights = {n: p for n, p in unet.named_parameters() if is_uce_weight(n)}
    if not weights:
        raise UsageError("this UNet has no cross-attention to_k/to_v weights (attn2.to_k, attn2.to_v); UCE edits those")
    return weights


@torch.no_grad()
def apply_terms(model, terms):
    """Fold the terms' solve into every cross-attention key and value weight: ``W <- W T`` (float64, rounded
    once to the weight's dtype). No terms leaves the model as it is."""
    weights = uce_weights(model.model.diffusion_model)
    width = next(iter(weights.values())).shape[1]
    transform = solve_transform(terms, width)
    if transform is None:
        return model
    for weight in weights.values():
        weight.copy_((weight.double() @ transform.to(weight.device)).to(weight.dtype))
    return model


def apply_uce_of(model, run_dir):
    """The UCE edit of a run folder, solved from its terms."""
    return apply_terms(model, read_terms(run_dir))


def relative_residual(weights, before, rows, targets):
    """Mean over layers of ``||W' rows^T - W_old targets^T|| / ||W_old targets^T||``."""
    errors = []
    for name, weight in weights.items():
        wanted = targets @ before[name].double().T
        errors.append(float((rows @ weight.detach().double().T - wanted).norm() / wanted.norm().clamp_min(1e-12)))
    return sum(errors) / len(errors)


class UCEEditor(ErasureTrainer):
    """UCE as the erase loop sees a method: one 'iteration', the solve. Nothing is optimised, so there is no
    optimizer; the resumable state is the settings and whether the solve ran (it is deterministic)."""

    def __init__(self, model, settings):
        self.settings = settings.check()
        self.model = model
        self.weights = uce_weights(model.model.diffusion_model)
        self.terms = build_terms(model, settings)
        self._before = {n: w.detach().clone() for n, w in self.weights.items()}
        self.iteration, self.losses, self.residuals = 0, [], {}

    def total_iterations(self):
        return 1

    def step(self):
        """The edit: solve and fold, then measure how closely the erased rows meet their guides' outputs."""
        apply_terms(self.model, self.terms)
        self.iteration = 1
        erase = torch.cat([t["erase"] for t in self.terms]).double()
        guide = torch.cat([t["guide"] for t in self.terms]).double()
        self.residuals = {"erase_residual": relative_residual(self.weights, self._before, erase, guide)}
        kept = [t["preserve"] for t in self.terms if len(t["preserve_prompts"])]
        if kept:
            rows = torch.cat(kept).double()
            self.residuals["preserve_residual"] = relative_residual(self.weights, self._before, rows, rows)
        self.losses.append(self.residuals["erase_residual"])
        return self.losses[-1]

    def state_dict(self):
        return {"iteration": self.iteration, "settings": self.settings.as_dict()}

    def load_state_dict(self, state):
        if state["settings"] != self.settings.as_dict():
            raise UsageError("cannot resume: the checkpoint was made with other settings; rerun with the same "
                             "arguments or start a new run")
        if int(state["iteration"]) and not self.iteration:
            self.step()

    def summary(self):
        return {**{k: round(v, 6) for k, v in self.residuals.items()},
                "edited_prompts": sum(len(t["erase_prompts"]) for t in self.terms),
                "preserved_prompts": len({p for t in self.terms for p in t["preserve_prompts"]})}

    def describe(self):
        lines = []
        for t in self.terms:
            kept = t["preserve_prompts"]
            lines.append(f"UCE '{t['concept']}': {len(t['erase_prompts'])} prompts to guide "
                         f"'{t['guide_prompts'][0]}'; preserving {', '.join(repr(k) for k in kept) or 'nothing'}")
        return lines

    def record(self):
        return {"guides": [t["guide_prompts"][0] for t in self.terms],
                "preserved": {t["concept"]: t["preserve_prompts"] for t in self.terms}}

    def save_edit(self, run_dir, metadata):
        save_terms(run_dir, self.terms, metadata)

    def edited_model(self):
        return self.model

    def base_values(self):
        return self._before
