"""CPE's Residual Attention Gates (ResAG) as pure functions of their tensors, and a trained run's ResAGs
wrapped around a model's cross-attention ``to_k``/``to_v`` (ours or a diffusers UNet) by forward hooks.

On the text embedding ``E`` (tokens x width):

    Q = E U1,  K = E U2,  P = softmax(Q K^T / T),  Ebar = P E,  g = sigmoid(Ebar v)
    out = W E + (g * Ebar) A_l B_l (alpha / r)

``T`` is the gate's temperature: 1 in the public code (runs written before the setting existed used
``sqrt(r_gate)`` and load with it). An optional floor (our extension, 0 = off) zeroes gates below it, so a
prompt on which a concept's gate is merely small gets exactly no residual.

The gate (``U1``, ``U2``, ``v``) is shared by every layer of one concept; ``A_l``, ``B_l`` are per layer;
``B`` and ``v`` start at zero, so an untrained ResAG changes nothing. With several concepts each token
takes the residual of the concept whose gate is highest on it. Training is ``ldm.erasure.cpe``'s.
"""
import math
from pathlib import Path

import torch

from ldm.runs import read_term, term_files
from ldm.util import UsageError


def is_gated_projection(name):
    """The projections a ResAG wraps: ``to_k`` and ``to_v`` of every cross-attention layer (module names)."""
    return name.endswith("attn2.to_k") or name.endswith("attn2.to_v")


def gated_projections(unet):
    """``{name: nn.Linear}`` of the projections a ResAG wraps, in the UNet's order."""
    layers = {n: m for n, m in unet.named_modules() if is_gated_projection(n)}
    if not layers:
        raise UsageError("this UNet has no cross-attention to_k/to_v layers (attn2.to_k, attn2.to_v); CPE wraps those")
    return layers


def gate(E, U1, U2, v, temperature=1.0, floor=0.0):
    """The shared gate on text embeddings ``E`` (batch, tokens, width): ``(g * Ebar, g)`` with
    ``Ebar = softmax(E U1 (E U2)^T / temperature) E`` and ``g = sigmoid(Ebar v)`` per token; gates below
    ``floor`` are zero."""
    Q, K = E @ U1, E @ U2
    P = torch.softmax(Q @ K.transpose(-1, -2) / temperature, dim=-1)
    E_bar = P @ E
    g = torch.sigmoid(E_bar @ v)
    if floor > 0:
        g = torch.where(g >= floor, g, torch.zeros_like(g))
    return g.unsqueeze(-1) * E_bar, g


def gate_coordinates(E, U1, U2, v, A, temperature=1.0, floor=0.0):
    """``((g * Ebar) A, g)`` of ``gate``, never forming ``Ebar`` (batch, tokens, width): ``Ebar A = P (E A)`` and
    ``Ebar v = P (E v)``, so the attention mixes a few columns instead of the text width (training's form). The
    same values as ``gate``; under a floor, the gradient is the unfloored gate's (a straight-through floor)."""
    Q, K, projected = (E @ torch.cat([U1, U2, A, v[:, None]], dim=1)).split([U1.shape[1], U2.shape[1],
                                                                              A.shape[1] + 1], dim=-1)
    mixed = torch.softmax(Q @ K.transpose(-1, -2) / temperature, dim=-1) @ projected
    g = torch.sigmoid(mixed[..., -1])
    if floor > 0:  # the floored gate forward, the unfloored one's gradient: a gate below the floor can reopen
        g = g + (torch.where(g >= floor, g, torch.zeros_like(g)) - g).detach()
    return g.unsqueeze(-1) * mixed[..., :-1], g


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


COMBINATIONS = ("highest-gate", "sum")


def combine(gates, residuals, how):
    """Several concepts' residuals on each token: ``highest-gate`` (the public code) takes the concept whose
    gate is highest there (``select_by_gate``); ``sum`` (ours) adds every concept's gated residual, so a token
    the target's gate opens on is never handed to a concept whose gate is merely a little higher."""
    if how == "sum":
        return torch.stack(list(residuals)).sum(dim=0)
    return select_by_gate(gates, residuals)


class ResAG:
    """One concept's ResAG: gate tensors ``U1``, ``U2`` (width x gate_rank), ``v`` (width), and per wrapped
    layer ``A`` (width x rank) and ``B`` (rank x out), ``B`` and ``v`` zero."""

    def __init__(self, concept, tensors, rank, gate_rank, alpha, temperature=1.0, floor=0.0, combination="highest-gate"):
        self.concept, self.tensors = concept, tensors
        self.rank, self.gate_rank, self.alpha = rank, gate_rank, alpha
        self.scale = alpha / rank
        self.temperature, self.floor, self.combination = temperature, floor, combination

    @classmethod
    def new(cls, concept, layers, width, rank, gate_rank, alpha, generator, device="cpu", temperature=1.0, floor=0.0):
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
        return cls(concept, tensors, rank, gate_rank, alpha, temperature, floor)

    @property
    def width(self):
        return self.tensors["U1"].shape[0]

    def gate(self, E):
        t = self.tensors
        return gate(E, t["U1"], t["U2"], t["v"], self.temperature, self.floor)

    def detached(self):
        """The same ResAG with detached tensors (for wrapping a model while training goes on)."""
        return ResAG(self.concept, {k: v.detach() for k, v in self.tensors.items()}, self.rank, self.gate_rank,
                     self.alpha, self.temperature, self.floor, self.combination)

    def residual(self, gated, layer):
        return layer_residual(gated, self.tensors[f"A.{layer}"], self.tensors[f"B.{layer}"], self.scale)


def combination_of(resags):
    """How ``resags`` combine on a token (``combine``); ResAGs trained to combine otherwise are a one-line error."""
    hows = {resag.combination for resag in resags}
    if len(hows) > 1:
        raise UsageError(f"these ResAGs were trained to combine differently ({', '.join(sorted(hows))}); load "
                         "terms of one run, or retrain them with one --gate_combination")
    return hows.pop() if hows else "highest-gate"


def residuals(resags, E, layers, how="highest-gate"):
    """``{layer: residual}`` of several concepts' ResAGs on ``E``, combined on each token as ``how``
    (``combine``)."""
    gates = [resag.gate(E) for resag in resags]
    return {layer: combine([g for _, g in gates], [r.residual(gated, layer) for r, (gated, _) in zip(resags, gates)],
                           how)
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
        self.combination = combination_of(self.resags)
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
            self._residuals = residuals(self.resags, context.float(), self.layers, self.combination)
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
        gate_rank = int(metadata["gate_rank"])
        # runs written before the temperature was a setting were trained with sqrt(gate_rank)
        temperature = float(metadata.get("gate_temperature", math.sqrt(gate_rank)))
        resags.append(ResAG(metadata["concept"], tensors, int(metadata["rank"]), gate_rank, float(metadata["alpha"]),
                            temperature, float(metadata.get("gate_floor", 0.0)),
                            metadata.get("gate_combination", "highest-gate")))  # runs before the setting: highest
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
    """A CPE run's edit: its ResAGs wrapped around the base model."""
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


