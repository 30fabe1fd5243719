"""CPE's loss in the text space: every wrapped projection as one linear map, its per-layer error as a quadratic
form in width x width Gram matrices, and a ResAG's per-layer tensors packed into a few for training.

Every output CPE compares is ``W y + z B`` (``y`` in the text space, ``z B`` the residual), so the Lipschitz-
weighted squared error of all layers at once needs ``G = W^T diag(omega) W`` (fixed), ``K = W^T diag(omega) B^T``
and ``J = B diag(omega) B^T`` (from the ResAG's ``B``): the projections' outputs (about 25,000 columns on SD v1)
are never formed. ``B`` is block-diagonal (one block per layer); ``K`` and ``J`` are computed block by block in
one batched product each, never from the dense block-diagonal matrix.
"""
import torch


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


class ProjectionGeometry:
    """The wrapped projections as one linear map ``W`` (all layers' output rows stacked) with per-row weights
    ``omega`` (a layer's Lipschitz weight over its width and the layer count), so that CPE's
    ``sum_l w_l mean((a_l - b_l)^2) / layers`` of ``a - b = W y + z B`` is
    ``mean(y G y + 2 y K z + z J z)``.

    A ResAG trains packed, five tensors instead of two per layer (one optimizer step, one product each): its
    gate's ``U1``, ``U2``, ``v``, ``A`` (width x layers*rank, layer ``l`` in columns ``l*rank ...``) and ``B``
    (layers x rank x the widest layer's outputs); ``pack``/``unpack`` convert to and from its per-layer tensors
    (``A.<layer>``, ``B.<layer>``), the form its term file keeps."""

    def __init__(self, layers, lipschitz, device):
        self.names = list(layers)
        self.widths = [layers[n].out_features for n in self.names]
        W = torch.cat([layers[n].weight.detach().float() for n in self.names]).to(device)
        self.omega = torch.cat([torch.full((layers[n].out_features,), lipschitz[n] / (layers[n].out_features * len(layers)))
                                for n in self.names]).to(device)
        self.W = W
        self.G = W.T @ (self.omega[:, None] * W)
        # per layer, diag(omega) W and omega padded to the widest layer (zero rows): one batched product each
        self.padded = max(self.widths)
        self.weighted_rows = torch.zeros(len(self.names), self.padded, W.shape[1], device=device)
        self.padded_omega = torch.zeros(len(self.names), self.padded, device=device)
        for i, (rows, omega) in enumerate(zip(W.split(self.widths), self.omega.split(self.widths))):
            self.weighted_rows[i, :len(rows)] = omega[:, None] * rows
            self.padded_omega[i, :len(rows)] = omega

    def pack(self, tensors):
        """A ResAG's per-layer tensors as ``{U1, U2, v, A, B}`` (new tensors, not views): ``A`` (width x
        layers*rank), ``B`` (layers x rank x the widest layer's outputs, zero beyond each layer's own; those
        entries get no gradient, so they stay zero)."""
        rank = tensors[f"B.{self.names[0]}"].shape[0]
        B = torch.zeros(len(self.names), rank, self.padded, device=tensors["U1"].device)
        for i, (name, width) in enumerate(zip(self.names, self.widths)):
            B[i, :, :width] = tensors[f"B.{name}"]
        return {"U1": tensors["U1"].clone(), "U2": tensors["U2"].clone(), "v": tensors["v"].clone(),
                "A": torch.cat([tensors[f"A.{n}"] for n in self.names], dim=1), "B": B}

    def unpack(self, packed):
        """The per-layer tensors of a packed ResAG, as views of ``packed`` (edits reach it)."""
        rank = packed["B"].shape[1]
        tensors = {"U1": packed["U1"], "U2": packed["U2"], "v": packed["v"]}
        for i, (name, width) in enumerate(zip(self.names, self.widths)):
            tensors[f"A.{name}"] = packed["A"].narrow(1, i * rank, rank)
            tensors[f"B.{name}"] = packed["B"][i, :, :width]
        return tensors

    def coupling(self, B, scale):
        """``(K, J)`` of a packed ``B`` times ``scale``: ``K = W^T diag(omega) B^T`` (width x layers*rank,
        columns as ``A``'s) and ``J``'s diagonal blocks ``B_l diag(omega_l) B_l^T`` (layers x rank x rank)."""
        B = B * scale
        K = torch.bmm(B, self.weighted_rows).permute(2, 0, 1).flatten(1)  # (layers, rank, width) -> width x (l, a)
        J = torch.bmm(B * self.padded_omega[:, None, :], B.transpose(1, 2))
        return K, J

    def quadratic(self, y):
        """``y G y`` per row."""
        return ((y @ self.G) * y).sum(-1)

    def error(self, y, z, K, J, yGy=None, row_weights=None):
        """The weighted squared error of ``W y + z B`` (rows x tokens) averaged over tokens and rows, or summed
        over rows with ``row_weights`` (``y`` None: the residual alone); ``z`` (rows, tokens, layers*rank) the
        residual's coordinates, ``yGy``: ``quadratic(y)`` when the caller has it."""
        blocks = z.reshape(*z.shape[:-1], J.shape[0], 1, J.shape[1])  # (..., layers, 1, rank)
        value = ((blocks @ J) * blocks).sum((-1, -2, -3))
        if y is not None:
            value = value + (self.quadratic(y) if yGy is None else yGy) + 2 * ((y @ K) * z).sum(-1)
        return value.mean() if row_weights is None else (value.mean(-1) * row_weights).sum()
