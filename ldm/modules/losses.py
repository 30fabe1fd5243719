"""Autoencoder training losses (CompVis ``lossconfig`` targets)."""
import torch.nn as nn


class ReconstructionKLLoss(nn.Module):
    """L1 + weighted L2 reconstruction plus a small KL term (CompVis' KL-autoencoder loss without the
    LPIPS and GAN terms, whose pretrained weights this project cannot download)."""

    def __init__(self, kl_weight=1e-6, l2_weight=1.0):
        super().__init__()
        self.kl_weight, self.l2_weight = kl_weight, l2_weight

    def forward(self, inputs, reconstructions, posterior):
        rec = (inputs - reconstructions).abs().mean() + self.l2_weight * (inputs - reconstructions).pow(2).mean()
        kl = posterior.kl().mean() / inputs[0].numel()
        return rec + self.kl_weight * kl
