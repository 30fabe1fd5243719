"""Datasets of the concept world for training tiny-sd and its evaluator (CompVis batch layout)."""
import copy
import hashlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ldm.data import concepts
from ldm.data.concepts import ATTRIBUTES, random_caption_named, render, sample_attributes

IGNORE = -100  # cross-entropy's ignore_index


def world_fingerprint(size, seed):
    """What a ``ConceptWorld(size, seed)`` holds: its size, seed and the renderer's source (its SHA-256),
    so that a training run cannot resume on a changed world."""
    source = Path(concepts.__file__).read_bytes()
    return {"size": size, "seed": seed, "renderer_sha256": hashlib.sha256(source).hexdigest()}


class ConceptWorld(Dataset):
    """``size`` rendered images with random attributes, pre-rendered once (seeded).

    Items are CompVis batches: ``image`` (H, W, 3) float in [-1, 1] (a random ``crop_size`` square of
    it when set), ``caption`` (a fresh random template each time it is read, empty at the template
    module's rate), the image's attribute indices and ``caption_<attribute>``: the index of the value
    the caption names, or ``IGNORE``.
    """

    def __init__(self, size=20000, seed=0, empty_caption_rate=0.1, crop_size=None):
        rng = np.random.default_rng(seed)
        self.crop_size = crop_size
        self.attributes = [sample_attributes(rng) for _ in range(size)]
        self.images = np.stack([render(*attrs, seed=(seed, i)) for i, attrs in enumerate(self.attributes)])
        self.seed, self.empty_caption_rate = seed, empty_caption_rate
        self.reads = np.zeros(size, dtype=np.int64)

    def cropped(self, crop_size):
        """The same images, read as random ``crop_size`` squares (with their own caption draws)."""
        view = copy.copy(self)
        view.crop_size, view.reads = crop_size, np.zeros_like(self.reads)
        return view

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        obj, color, style = self.attributes[i]
        rng = np.random.default_rng((self.seed, i, int(self.reads[i])))
        self.reads[i] += 1
        image = self.images[i]
        if self.crop_size:  # random crops: the autoencoder is convolutional and trains faster on them
            top, left = rng.integers(0, image.shape[0] - self.crop_size + 1, 2)
            image = image[top:top + self.crop_size, left:left + self.crop_size]
        caption, named = random_caption_named(obj, color, style, rng, self.empty_caption_rate)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)).float() / 127.5 - 1,
            "caption": caption,
            # what the caption names, per attribute (IGNORE where it names nothing): the text supervision
            **{f"caption_{k}": ATTRIBUTES[k].index(named[k]) if k in named else IGNORE for k in ATTRIBUTES},
            "object": ATTRIBUTES["object"].index(obj),
            "color": ATTRIBUTES["color"].index(color),
            "style": ATTRIBUTES["style"].index(style),
        }


class WithFirstStageMoments(Dataset):
    """``dataset`` plus ``first_stage_moments``: its images encoded once by a frozen first stage, so
    latent-diffusion training samples latents without running the encoder every step."""

    def __init__(self, dataset, first_stage_model, batch_size=256):
        self.dataset = dataset
        moments = []
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                images = torch.from_numpy(dataset.images[start:start + batch_size]).float() / 127.5 - 1
                posterior = first_stage_model.encode(images.permute(0, 3, 1, 2))
                moments.append(posterior.parameters.half())
        self.moments = torch.cat(moments)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return {**self.dataset[i], "first_stage_moments": self.moments[i]}
