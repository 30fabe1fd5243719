"""Latent diffusion trained with its text encoder, plus a supervision that keeps every named concept in
the text context (tiny-sd's training model; the exported checkpoint is a plain ``LatentDiffusion``).

Trained jointly from scratch on the diffusion loss alone, tiny-sd's text encoder collapsed the object
words: early on the UNet cannot yet use shape, so nothing keeps "circle" and "square" apart, they
merge (swapping them moved the context by 6%, swapping the style by 96%), and then the UNet never can
learn shape. SD's CLIP encoder comes pretrained on image-text pairs, which makes every concept
linearly readable from it; this stands in for that pretraining: linear heads read, from the
mean-pooled context, which object, color and style the caption names, and their cross-entropy is
added to the loss. It also asks for one direction per concept whatever the sentence, which is what
lets an erasure trained on the bare name reach composed prompts.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from ldm.data.concepts import ATTRIBUTES
from ldm.data.tiny_sd import IGNORE
from ldm.models.diffusion.ddpm import LatentDiffusion


class TextSupervisedLatentDiffusion(LatentDiffusion):
    """``LatentDiffusion`` plus ``text_loss_weight`` times the caption-attribute cross-entropy of linear
    heads (``text_heads.*``, dropped at export) on the mean-pooled text context."""

    def __init__(self, *args, text_loss_weight=0.1, **kwargs):
        super().__init__(*args, **kwargs)
        width = self.cond_stage_model.transformer.config.hidden_size
        self.text_heads = nn.ModuleDict({name: nn.Linear(width, len(values)) for name, values in ATTRIBUTES.items()})
        self.text_loss_weight = text_loss_weight

    def trainable_parameters(self):
        return super().trainable_parameters() + list(self.text_heads.parameters())

    def text_loss(self, context, batch):
        """Mean cross-entropy over the attributes the captions name (0 where a batch names none)."""
        pooled = context.float().mean(dim=1)
        losses = []
        for name, head in self.text_heads.items():
            labels = batch[f"caption_{name}"]
            named = labels != IGNORE
            if named.any():
                losses.append(F.cross_entropy(head(pooled[named]), labels[named]))
        return sum(losses) / max(len(losses), 1)

    def training_step(self, batch, batch_idx):
        z, captions = self.get_input(batch, self.first_stage_key)
        context = self.get_learned_conditioning(captions)
        t = torch.randint(0, self.num_timesteps, (len(z),), device=self.device).long()
        loss, logs = self.p_losses(z, context, t)
        text_loss = self.text_loss(context, batch)
        loss = loss + self.text_loss_weight * text_loss
        logs.update({"train/loss": loss, "train/text_loss": text_loss})
        self.log_dict(logs, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(z))
        return loss


def training_config(config, text_loss_weight=0.1):
    """tiny-sd's shipped config turned into its training config: this class as the target, the text
    encoder trained (its token table fixed: training all 49,408 rows made each step 1.7x slower) and
    EMA kept for the UNet and the text encoder."""
    return OmegaConf.merge(config, {"model": {
        "target": f"{__name__}.TextSupervisedLatentDiffusion",
        "params": {"use_ema": True, "cond_stage_trainable": True, "text_loss_weight": text_loss_weight,
                   "cond_stage_config": {"params": {"freeze": False, "freeze_token_embedding": True}}}}})
