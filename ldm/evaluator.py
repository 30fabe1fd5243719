"""The tiny-sd evaluator: a small CNN that says which object, color and style an image shows."""
import json

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import Dataset

from ldm.data.concepts import ATTRIBUTES, SIZE, render, sample_attributes
from ldm.data.tiny_sd import ConceptWorld, world_fingerprint
from ldm.generate import to_uint8
from ldm.training import fit
from ldm.util import UsageError, atomic_save_safetensors, tensors_sha256, warn

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


def augment(x, generator=None):
    """Perturbations like a generator's: noise, slight blur, brightness and contrast shifts."""
    b, options = x.shape[0], {"generator": generator, "device": x.device}
    x = x + 0.08 * torch.rand(b, 1, 1, 1, **options) * torch.randn(x.shape, **options)
    blur = torch.rand(b, **options) < 0.3
    if blur.any():
        kernel = torch.tensor([1.0, 2.0, 1.0], device=x.device)
        kernel = (kernel[:, None] * kernel[None]) / 16
        blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel.expand(3, 1, 3, 3), groups=3)
        x = torch.where(blur[:, None, None, None], blurred, x)
    scale = 1 + 0.1 * (torch.rand(b, 1, 1, 1, **options) - 0.5)
    shift = 0.1 * (torch.rand(b, 1, 1, 1, **options) - 0.5)
    return (x * scale + shift).clamp(-1, 1)


@torch.no_grad()
def reconstruct(first_stage, images, batch_size=200):
    """uint8 images (B, H, W, 3) passed through an autoencoder (encode, posterior mode, decode)."""
    out = []
    for start in range(0, len(images), batch_size):
        x = images_to_tensor(images[start:start + batch_size])
        out.append(to_uint8(first_stage.decode(first_stage.encode(x).mode())))
    return np.concatenate(out)


class EvaluatorViews(Dataset):
    """Training items for the evaluator: each read of image ``i`` is its render or, with probability
    ``reconstructed_share``, its reconstruction by tiny-sd's autoencoder (a label-preserving view:
    every generated image passes through that decoder, whose blur is not what the evaluator judges)."""

    def __init__(self, pool, reconstructions=None, reconstructed_share=0.5, seed=0):
        self.views = [pool.images] if reconstructions is None else [pool.images, reconstructions]
        self.labels = {name: torch.tensor([ATTRIBUTES[name].index(a[k]) for a in pool.attributes])
                       for k, name in enumerate(HEADS)}
        self.share, self.seed = reconstructed_share, seed
        self.reads = np.zeros(len(pool.images), dtype=np.int64)

    def __len__(self):
        return len(self.views[0])

    def __getitem__(self, i):
        rng = np.random.default_rng((self.seed, i, int(self.reads[i])))
        self.reads[i] += 1
        view = self.views[1] if len(self.views) > 1 and rng.random() < self.share else self.views[0]
        return {"image": images_to_tensor(view[i:i + 1])[0], **{name: self.labels[name][i] for name in HEADS}}


class EvaluatorTraining(pl.LightningModule):
    """Lightning wrapper that trains a ConceptClassifier (AdamW, one-cycle schedule over ``steps``)."""

    def __init__(self, classifier, steps, weight_decay=1e-4):
        super().__init__()
        self.classifier, self.steps, self.weight_decay = classifier, steps, weight_decay

    def training_step(self, batch, batch_idx):
        logits = self.classifier(augment(batch["image"]))
        loss = sum(F.cross_entropy(logits[name], batch[name]) for name in HEADS)
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=len(batch["image"]))
        return loss

    def configure_optimizers(self):
        lr = getattr(self, "learning_rate", 2e-3)
        optimizer = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=self.steps)
        return [optimizer], [{"scheduler": schedule, "interval": "step"}]


def train_evaluator(work_dir, steps=4000, batch_size=64, lr=2e-3, seed=0, pool_size=20000, first_stage=None,
                    reconstructed_share=0.5):
    """Train a ConceptClassifier on a pool of rendered images (and, with ``first_stage``, their
    reconstructions) through the Lightning Trainer; resumable from ``work_dir``. Returns the model."""
    pool = ConceptWorld(size=pool_size, seed=seed + 1000)
    reconstructions = None if first_stage is None else reconstruct(first_stage, pool.images)
    torch.manual_seed(seed)
    module = EvaluatorTraining(ConceptClassifier(), steps)
    fingerprint = {"world": world_fingerprint(pool_size, seed + 1000), "reconstructed_share": reconstructed_share,
                   "autoencoder_sha256": None if first_stage is None else tensors_sha256(first_stage.state_dict())}
    fit(module, EvaluatorViews(pool, reconstructions, reconstructed_share, seed), work_dir, steps, batch_size, lr,
        seed=seed, fingerprint=fingerprint)
    return module.classifier.eval()


def heldout_accuracy(model, count=500, seed=12345, first_stage=None):
    """Accuracy per head on ``count`` freshly rendered images unseen in training (with ``first_stage``,
    on their reconstructions by that autoencoder instead)."""
    images, labels = render_batch(np.random.default_rng(seed), count, seed_base=10**6 + seed)
    if first_stage is not None:
        images = reconstruct(first_stage, images)
    predictions = classify(model, images)
    return {name: float(np.mean([ATTRIBUTES[name].index(p) for p in predictions[name][0]] == labels[name].numpy()))
            for name in HEADS}


def save_evaluator(model, path, first_stage=None):
    """Save weights and architecture as safetensors. The metadata holds the width, the class names, the
    renderer's SHA-256 and, when it was trained on reconstructions, the autoencoder's (``first_stage``)."""
    metadata = {"width": str(model.width), "classes": json.dumps(ATTRIBUTES),
                "renderer_sha256": world_fingerprint(0, 0)["renderer_sha256"]}
    if first_stage is not None:
        metadata["autoencoder_sha256"] = tensors_sha256(first_stage.state_dict())
    return atomic_save_safetensors(model.state_dict(), path, metadata)


def check_autoencoder(evaluator, first_stage):
    """Warn when ``evaluator`` was trained on another autoencoder's reconstructions than ``first_stage``'s
    (its accuracy on that model's images is then unmeasured); returns whether they match."""
    recorded = evaluator.metadata.get("autoencoder_sha256")
    if recorded is None or recorded == tensors_sha256(first_stage.state_dict()):
        return True
    warn("the evaluator was trained on another autoencoder's reconstructions than this model's; retrain it with "
         "train-scripts/train-evaluator.py for this model")
    return False


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
    model.metadata = metadata
    return model.to(device).eval()
