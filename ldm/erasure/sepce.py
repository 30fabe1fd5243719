"""SepCE: Separable Concept Erasure (Zhao et al., 2024).

For concept i, ``E_i`` stacks the text embeddings (every context token) of ``""`` and of every protected
concept (its keep set, and the concepts and keep sets of earlier terms); ``S_i`` (width x k) is an
orthonormal basis of its null space (``ldm.text_geometry.null_space``: SVD, singular values below
``rtol`` times the largest count as null). In every cross-attention layer, for ``to_k`` and ``to_v``:

    W' = W + sum_i alpha_{i,l} @ (beta * S_i^T)        alpha_{i,l}: (d_out x k), zero-initialised

``S_i^T e = 0`` for every protected embedding row ``e``, so their keys and values, and hence the
unconditional and protected predictions, are the base model's. Only ``alpha_i`` trains, with CiE's
loss for concept i. Each concept's term (alphas, ``S_i``, ``beta``, the concept, its protected set) is
its own ``term-<concept>.safetensors`` in the run folder; loading a run adds the sum of its terms to
the base weights (``apply_terms_of``), and dropping a term (``restore-concept.py``) restores its concept.
"""
import json
from dataclasses import dataclass

import torch
from torch.func import functional_call

from ldm.data.prompt_sets import all_concepts
from ldm.erasure.cie import CiESettings, ConceptIrrelevance
from ldm.erasure.settings import setting
from ldm.erasure.trainer import ErasureTrainer
from ldm.runs import read_term, save_term, term_files
from ldm.text_geometry import NULL_SPACE_RTOL, null_space, protected_prompts, stacked_embeddings
from ldm.util import UsageError, check_positive

MIN_NULL_DIMS = 8


def is_separable_weight(name):
    """The weights a SepCE term edits: ``to_k`` and ``to_v`` of every cross-attention layer."""
    return "attn2.to_k.weight" in name or "attn2.to_v.weight" in name


def default_keep(concept):
    """tiny-sd's default keep set: every other value of the concept's attribute (styles as prompts name
    them); a concept outside the tiny-sd world has none (``--keep`` is then needed)."""
    if concept not in all_concepts():
        raise UsageError(f"'{concept}' has no default keep set (it is not a tiny-sd concept); name the concepts "
                         "to protect with --keep 'a,b,...'")
    return protected_prompts(concept)[1:]


def protected_set(keep, earlier_terms=(), concept=None):
    """The prompts a new term must leave unchanged: ``""``, the keep set, and every earlier term's
    concept and protected set (iterative erasure), without repeats, in order. ``concept`` itself is
    left out: an earlier term may have protected it (Seurat, kept when Van Gogh was erased), and that
    term keeps leaving it unchanged, but the new term is the one that erases it."""
    prompts = ["", *keep]
    for term in earlier_terms:
        prompts += [term["concept"], *term["protected"]]
    return [p for p in dict.fromkeys(prompts) if concept is None or p.strip() != concept.strip()]


@dataclass
class SepCESettings(CiESettings):
    """Everything that determines a SepCE run: CiE's loss and stop rule, and the term's protected set. Defaults:
    the public code's (SD v1); tiny-sd's config sets its own (``sepce_defaults:``)."""
    keep: str = setting(None, "comma-separated concepts to protect exactly (with the empty prompt); none for a "
                              "tiny-sd concept: every other value of its attribute", config=False)
    on: str = setting(None, "a SepCE run whose terms stay fixed: erase this concept on top", config=False,
                      metavar="RUN")
    beta: float = setting(1.0, "scale of the basis in alpha (beta S^T)")
    rtol: float = setting(NULL_SPACE_RTOL, "null space: singular directions below rtol x the largest count as null")

    def keep_set(self):
        """The concepts the term protects (with ``""``): ``--keep``, else tiny-sd's default for the concept."""
        if self.keep is None:
            return default_keep(self.prompt)
        return [k.strip() for k in self.keep.split(",")]

    def check(self):
        """Refuse bad settings with one line each (CiE's checks, then the keep set's)."""
        super().check()
        keep = [k.strip() for k in self.keep_set()]
        if not any(keep):
            raise UsageError("the keep set is empty: SepCE protects the concepts it is built against; name them "
                             "with --keep 'a,b,...' (the empty prompt is always protected)")
        if self.prompt.strip() in keep:
            raise UsageError(f"'{self.prompt}' is in its own keep set; a concept cannot be erased and protected "
                             "at once: drop it from --keep")
        check_positive(self, "beta", "rtol")
        return self


def term_basis(model, protected, rtol=NULL_SPACE_RTOL, concept=None):
    """``S`` (width x k, float64): an orthonormal basis of the null space of the protected prompts'
    stacked embeddings. Fewer than ``MIN_NULL_DIMS`` dimensions is a one-line error."""
    basis = null_space(stacked_embeddings(model, protected), rtol)
    width = basis.shape[0]
    if basis.shape[1] < MIN_NULL_DIMS:
        raise UsageError(f"the null space of the {len(protected)} protected prompts is {basis.shape[1]}-dimensional "
                         f"(< {MIN_NULL_DIMS}) in this {width}-wide text space: too many protected concepts to erase "
                         f"{concept or 'a concept'} without touching them; protect fewer (--keep) or erase from "
                         "a run with fewer terms")
    return basis


def weight_delta(alpha, basis, beta):
    """One term's change of one weight: ``alpha @ (beta S^T)``."""
    return alpha @ (beta * basis.T)


def read_terms(run_dir):
    """The terms of a run folder, each ``{"concept", "protected", "beta", "basis", "alphas", "path"}``."""
    terms = []
    for path in term_files(run_dir):
        tensors, metadata = read_term(path)
        alphas = {k[len("alpha."):]: v for k, v in tensors.items() if k.startswith("alpha.")}
        terms.append({"concept": metadata["concept"], "protected": json.loads(metadata.get("protected", "[]")),
                      "beta": float(metadata["beta"]), "basis": tensors["basis"], "alphas": alphas, "path": path,
                      "metadata": metadata})
    return terms


@torch.no_grad()
def apply_terms(model, terms):
    """Add every term to the base weights: ``W' = W + sum_i alpha_i @ (beta_i S_i^T)``, summed in float64
    and rounded once to the weight's dtype. Every edited weight must exist with a matching shape."""
    params = dict(model.model.diffusion_model.named_parameters())
    total = {}
    for term in terms:
        basis = term["basis"].double()
        for name, alpha in term["alphas"].items():
            if name not in params or params[name].shape != (alpha.shape[0], basis.shape[0]):
                raise UsageError(f"term '{term['concept']}' ({term['path']}) edits '{name}' with a shape this model "
                                 "lacks; it was trained on another base model")
            total[name] = total.get(name, 0) + weight_delta(alpha.double(), basis, term["beta"])
    for name, delta in total.items():
        params[name].copy_((params[name].double() + delta.to(params[name].device)).to(params[name].dtype))
    return model


def apply_terms_of(model, run_dir):
    """The SepCE edit of a run folder: its terms added to the base."""
    return apply_terms(model, read_terms(run_dir))


class SepCETrainer(ConceptIrrelevance, ErasureTrainer):
    """SepCE for one concept over a ``LatentDiffusion`` model, with ``earlier_terms`` (iterative erasure)
    folded into the model and kept fixed. Only the new term's alphas train; the student is the model
    with ``W + alpha @ (beta S^T)`` in place of each ``to_k``/``to_v``; the frozen model is the model as
    loaded (base plus earlier terms)."""

    def __init__(self, model, settings, latents, protected, basis, earlier_terms=(), device="cpu", autocast_dtype=None):
        self.settings = settings.check()
        if settings.prompt.strip() in [t["concept"] for t in earlier_terms]:
            raise UsageError(f"'{settings.prompt}' is already erased by the run given to --on; restore it first "
                             "(restore-concept.py) or erase another concept")
        self.model, self.unet = model, model.model.diffusion_model
        self.unet.requires_grad_(False)
        self.earlier_terms = list(earlier_terms)
        apply_terms(model, self.earlier_terms)
        self.protected = protected
        self.basis64 = basis  # term_basis(model, protected, rtol): computed first, as it can refuse the set
        self.basis = self.basis64.float().to(device)
        weights = {n: p for n, p in self.unet.named_parameters() if is_separable_weight(n)}
        if not weights:
            raise UsageError("this UNet has no cross-attention to_k/to_v weights (attn2.to_k, attn2.to_v); "
                             "SepCE edits those")
        self.weights = weights
        self._before, self._folded = {n: w.detach().clone() for n, w in weights.items()}, False
        alphas = {n: torch.zeros(w.shape[0], self.basis.shape[1], device=device, requires_grad=True)
                  for n, w in weights.items()}
        super().__init__(alphas, settings.lr, settings.seed, device, autocast_dtype)
        self.init_objective(model, settings, latents)

    def deltas(self):
        """The new term's change of each edited weight (differentiable in the alphas)."""
        return {n: weight_delta(alpha, self.basis, self.settings.beta) for n, alpha in self.params.items()}

    def student(self, x, t, context):
        self._student_deltas = self.deltas()
        edited = {n: self.weights[n] + d for n, d in self._student_deltas.items()}
        with self.autocast():
            return functional_call(self.unet, edited, (x, t), {"context": context}, strict=False).float()

    def frozen(self, x, t, context):
        with torch.no_grad(), self.autocast():
            return self.unet(x, t, context=context).float()

    def weight_deltas(self):
        return list(self.deltas().values())

    def edited_weights(self):
        """The last ``student`` call's weight changes: their gradient is d L / d W of the edited weights."""
        return list(self._student_deltas.values())

    def summary(self):
        return {**super().summary(), "null_space_dims": int(self.basis.shape[1]),
                "text_width": int(self.basis.shape[0]), "protected_prompts": len(self.protected)}

    def describe(self):
        return [f"SepCE '{self.settings.prompt}': null space {self.basis.shape[1]} of {self.basis.shape[0]} dims, "
                f"protecting {len(self.protected)} prompts: {', '.join(repr(p) for p in self.protected)}"]

    def record(self):
        return {"protected": list(self.protected), "earlier": [t["concept"] for t in self.earlier_terms]}

    def new_term(self):
        """The trained term: its alphas, basis and beta, with its concept and protected set."""
        return {"concept": self.settings.prompt, "protected": self.protected, "beta": self.settings.beta,
                "basis": self.basis64.float().cpu(), "alphas": {n: a.detach().cpu() for n, a in self.params.items()},
                "metadata": {"l1_lambda": str(self.l1_lambda), "stop_iteration": str(self.rule.stop_iteration)}}

    def save_edit(self, run_dir, metadata):
        """Every term of the run: the earlier ones as they were, and the new one."""
        for term in [*self.earlier_terms, self.new_term()]:
            tensors = {"basis": term["basis"], **{f"alpha.{n}": a for n, a in term["alphas"].items()}}
            save_term(run_dir, term["concept"], tensors,
                      {**metadata, **term.get("metadata", {}), "protected": json.dumps(term["protected"]),
                       "beta": term["beta"], "null_space_dims": term["basis"].shape[1]})

    def edited_model(self):
        """The model with the new term folded in (the earlier ones already are)."""
        if not self._folded:
            apply_terms(self.model, [self.new_term()])
            self._folded = True
        return self.model

    def base_values(self):
        """The edited weights as they were before this run's term (base plus earlier terms)."""
        return self._before
