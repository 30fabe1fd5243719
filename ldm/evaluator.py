"""The tiny-sd evaluator: a small CNN that says which object, color and style an image shows."""
import json

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ldm.data.concepts import ATTRIBUTES, SIZE, render, sample_attributes
from ldm.util import UsageError, atomic_path

HEADS = tuple(ATTRIBUTES)  # object, color, style


def _block(c_in, c_out, stride):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(8, c_out), nn.SiLU())


class ConceptClassifier(nn.Module):
    """Three-headed CNN over 64x64 RGB images in [-1, 1]; ``forward`` returns a dict of logits."""

    def __init__(self, width=16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _block(3, w, 2), _block(w, 2 * w, 1), _block(2 * w, 2 * w, 2),
            _block(2 * w, 4 * w, 1), _block(4 * w, 4 * w, 2), _block(4 * w, 4 * w, 1),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(8 * w, len(ATTRIBUTES[name])) for name in HEADS})
        self.width = width

    def embed(self, images):
        """Pooled features (B, 8 * width): mean and max over positions (the feature space for FID)."""
        h = self.features(images)
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)

    def forward(self, images):
        features = self.embed(images)
        return {name: head(features) for name, head in self.heads.items()}


def images_to_tensor(images):
    """uint8 images (B, H, W, 3) to a float tensor (B, 3, H, W) in [-1, 1], resized to 64x64."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    if x.shape[-1] != SIZE or x.shape[-2] != SIZE:
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x


@torch.no_grad()
def classify(model, images, batch_size=256):
    """Predicted names and probabilities per head for uint8 images: {head: (names, probs (B, n))}."""
    model.eval()
    probs = {name: [] for name in HEADS}
    for start in range(0, len(images), batch_size):
        logits = model(images_to_tensor(images[start:start + batch_size]).to(next(model.parameters()).device))
        for name in HEADS:
            probs[name].append(logits[name].softmax(-1).cpu())
    result = {}
    for name in HEADS:
        p = torch.cat(probs[name])
        result[name] = ([ATTRIBUTES[name][i] for i in p.argmax(-1).tolist()], p.numpy())
    return result


def render_batch(rng, count, seed_base):
    """``count`` fresh rendered images with their attribute indices (images uint8, labels dict)."""
    attrs = [sample_attributes(rng) for _ in range(count)]
    images = np.stack([render(*a, seed=(seed_base, i)) for i, a in enumerate(attrs)])
    labels = {name: torch.tensor([ATTRIBUTES[name].index(a[k]) for a in attrs]) for k, name in enumerate(HEADS)}
    return images, labels


def augment(x, generator):
    """Perturbations like a generator's: noise, slight blur, brightness and contrast shifts."""
    b = x.shape[0]
    x = x + 0.08 * torch.rand(b, 1, 1, 1, generator=generator) * torch.randn(x.shape, generator=generator)
    blur = torch.rand(b, generator=generator) < 0.3
    if blur.any():
        kernel = torch.tensor([1.0, 2.0, 1.0])
        kernel = (kernel[:, None] * kernel[None]) / 16
        blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel.expand(3, 1, 3, 3), groups=3)
        x = torch.where(blur[:, None, None, None], blurred, x)
    scale = 1 + 0.1 * (torch.rand(b, 1, 1, 1, generator=generator) - 0.5)
    shift = 0.1 * (torch.rand(b, 1, 1, 1, generator=generator) - 0.5)
    return (x * scale + shift).clamp(-1, 1)


@torch.no_grad()
def reconstruct(first_stage, images, batch_size=200):
    """uint8 images (B, H, W, 3) passed through an autoencoder (encode, posterior mode, decode)."""
    from ldm.generate import to_uint8
    out = []
    for start in range(0, len(images), batch_size):
        x = images_to_tensor(images[start:start + batch_size])
        out.append(to_uint8(first_stage.decode(first_stage.encode(x).mode())))
    return np.concatenate(out)


def train_evaluator(steps=3000, batch_size=64, lr=2e-3, seed=0, pool_size=20000, first_stage=None,
                    reconstructed_share=0.5, progress=True):
    """Train a ConceptClassifier on freshly rendered images; returns the model.

    With ``first_stage`` (tiny-sd's autoencoder), ``reconstructed_share`` of each batch is shown as
    that autoencoder reconstructs it. Every generated image passes through its decoder, whose blur
    (Seurat's dots melt into the ground, for one) is not what the evaluator should judge; a label
    survives reconstruction, so these are label-preserving views like the other perturbations.
    """
    from tqdm.auto import tqdm
    from ldm.data.tiny_sd import ConceptWorld
    torch.manual_seed(seed)
    pool = ConceptWorld(size=pool_size, seed=seed + 1000)
    views = [pool.images] if first_stage is None else [pool.images, reconstruct(first_stage, pool.images)]
    labels = {name: torch.tensor([ATTRIBUTES[name].index(a[k]) for a in pool.attributes])
              for k, name in enumerate(HEADS)}
    model = ConceptClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(steps), desc="evaluator", disable=not progress):
        index = torch.randint(len(pool), (batch_size,), generator=generator)
        images = views[0][index.numpy()]
        if len(views) > 1:
            swap = (torch.rand(batch_size, generator=generator) < reconstructed_share).numpy()
            images[swap] = views[1][index.numpy()[swap]]
        x = augment(images_to_tensor(images), generator)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[name], labels[name][index]) for name in HEADS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def heldout_accuracy(model, count=500, seed=12345, first_stage=None):
    """Accuracy per head on ``count`` freshly rendered images unseen in training (with ``first_stage``,
    on their reconstructions by that autoencoder instead)."""
    images, labels = render_batch(np.random.default_rng(seed), count, seed_base=10**6 + seed)
    if first_stage is not None:
        images = reconstruct(first_stage, images)
    predictions = classify(model, images)
    return {name: float(np.mean([ATTRIBUTES[name].index(p) for p in predictions[name][0]] == labels[name].numpy()))
            for name in HEADS}


def save_evaluator(model, path):
    """Save weights and architecture as safetensors (metadata holds the width and class names)."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"width": str(model.width), "classes": json.dumps(ATTRIBUTES)})
    return path


def load_evaluator(path, device="cpu"):
    """Load a saved ConceptClassifier (safetensors, no pickle)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as error:
        raise UsageError(f"evaluator '{path}' cannot be read ({error}); train one with "
                         "train-scripts/train-evaluator.py") from None
    if json.loads(metadata.get("classes", "{}")) != {k: list(v) for k, v in ATTRIBUTES.items()}:
        raise UsageError(f"evaluator '{path}' was trained on other class names than this concept world")
    model = ConceptClassifier(width=int(metadata["width"]))
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.to(device).eval()
