"""Image-quality metrics over folders of generated images, all through torchmetrics.

- CLIP score between each image and its prompt (torchmetrics' ``CLIPScore``: 100 * cosine of CLIP's
  projected embeddings, averaged, the mean floored at 0), with a CLIP model from a local folder.
- FID between two folders with the standard Inception features (torchmetrics' FID, which runs
  torch-fidelity's Inception v3 from a local weights file).
- For tiny-sd, where no Inception or CLIP weights exist: the same Frechet distance computed on the
  tiny-sd evaluator's penultimate features, so an edited model's drift on prompts without the erased
  concept is measured against its base.
"""
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.data.concepts import SIZE
from ldm.evaluation import list_images, read_images
from ldm.evaluator import images_to_tensor
from ldm.paths import SHIPPED_MODELS_DIR
from ldm.util import UsageError

CLIP_SCORE_MODEL = SHIPPED_MODELS_DIR / "clip-score"
INCEPTION_WEIGHTS = SHIPPED_MODELS_DIR / "inception" / "pt_inception-2015-12-05-6726825d.pth"
CLIP_SCORE_FILES = ("config.json", "preprocessor_config.json")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def image_files(folder):
    """Every image file in ``folder`` (any name: a reference set such as COCO's keeps its own), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"image folder '{folder}' not found")
    names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not names:
        raise UsageError(f"'{folder}' holds no images (.png, .jpg, .webp)")
    return names


def folder_batches(folder, batch_size, size=None, names=None):
    """The readable images of ``folder`` (all, or its ``names``) as uint8 (B, 3, H, W) tensors, with their
    names; unreadable images are skipped, so the callers count what they scored."""
    names = image_files(folder) if names is None else list(names)
    for start in range(0, len(names), batch_size):
        images, ok, _ = read_images(folder, names[start:start + batch_size], size=size)
        if images:
            yield torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), ok


def _check_clip_folder(folder):
    folder = Path(folder)
    weights = any((folder / n).is_file() for n in ("model.safetensors", "pytorch_model.bin"))
    tokenizer = (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()
    if not (weights and tokenizer and all((folder / n).is_file() for n in CLIP_SCORE_FILES)):
        raise UsageError(f"CLIP score needs a full CLIP model (config.json, model.safetensors, tokenizer and "
                         f"preprocessor files) in '{folder}'; copy a snapshot of openai/clip-vit-large-patch14 "
                         f"there, or pass --clip_model DIR")
    return folder


class ProjectedCLIP(torch.nn.Module):
    """A CLIPModel whose ``get_image_features``/``get_text_features`` return the projected embeddings
    as tensors, as torchmetrics expects; transformers 5 returns output objects holding them as
    ``pooler_output``."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip
        self.config = clip.config

    @staticmethod
    def _embedding(output):
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, *args, **kwargs):
        return self._embedding(self.clip.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return self._embedding(self.clip.get_text_features(*args, **kwargs))


def load_clip(folder, device="cpu"):
    """CLIP model (as ``ProjectedCLIP``) and processor from a local folder (never downloads)."""
    from transformers import CLIPModel, CLIPProcessor
    folder = _check_clip_folder(folder)
    model = CLIPModel.from_pretrained(str(folder), local_files_only=True).to(device).eval()
    return ProjectedCLIP(model), CLIPProcessor.from_pretrained(str(folder), local_files_only=True)


def clip_score(folder, prompts, clip_folder=CLIP_SCORE_MODEL, batch_size=64, device="cpu", progress=True):
    """Mean CLIP score (0-100) of the images in ``folder`` against their prompts.

    ``prompts`` maps case_number to prompt; images of cases it lacks are an error.
    """
    from torchmetrics.multimodal.clip_score import CLIPScore
    model, processor = load_clip(clip_folder, device)
    metric = CLIPScore(model_name_or_path=lambda: (model, processor)).to(device)
    table = list_images(folder)
    missing = sorted(set(table["case_number"]) - set(prompts))
    if missing:
        raise UsageError(f"images of case_number {missing[0]} (and {len(missing) - 1} more) have no prompt in the CSV")
    case_of = dict(zip(table["image"], table["case_number"]))
    for images, names in tqdm(folder_batches(folder, batch_size, names=table["image"]), desc="clip score",
                              disable=not progress):
        metric.update(images.to(device), [prompts[case_of[n]] for n in names])
    return float(metric.compute())


class EvaluatorFeatures(torch.nn.Module):
    """The tiny-sd evaluator's penultimate features, as a torchmetrics feature extractor
    (uint8 images in, (N, d) features out)."""

    def __init__(self, evaluator):
        super().__init__()
        self.evaluator = evaluator.eval()
        self.num_features = evaluator.width * 8

    @torch.no_grad()
    def forward(self, images):
        x = images_to_tensor(images.permute(0, 2, 3, 1).cpu().numpy()).to(next(self.evaluator.parameters()).device)
        return self.evaluator.embed(x)


def _fid_metric(features):
    from torchmetrics.image.fid import FrechetInceptionDistance
    return FrechetInceptionDistance(feature=features, normalize=False, reset_real_features=True)


def inception_fid_metric(weights_path=INCEPTION_WEIGHTS):
    """torchmetrics' FID with torch-fidelity's Inception v3 (2048 features) from a local weights file."""
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise UsageError(f"FID needs the Inception v3 weights {weights_path.name} at '{weights_path}' (torch-fidelity's "
                         "release file, as clean-fid and torchmetrics use); put it there or pass --inception_weights")
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        raise UsageError("FID with Inception needs torch-fidelity and torchvision: pip install torch-fidelity and the "
                         "torchvision build matching torch (see docs/evaluation.md)") from None
    from torchmetrics.image.fid import FrechetInceptionDistance
    return FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights_path))


def frechet_distance(metric, real_folder, fake_folder, batch_size=64, size=None, device="cpu", progress=True,
                     names=None):
    """Feed two image folders to a torchmetrics FID ``metric`` (``real_folder`` as the reference), every
    image of each, or only ``names`` in both; returns (distance, images in real, images in fake)."""
    metric = metric.to(device)
    counts = {}
    for folder, real in ((real_folder, True), (fake_folder, False)):
        counts[real] = 0
        for images, names_read in tqdm(folder_batches(folder, batch_size, size=size, names=names),
                                       desc=Path(folder).name, disable=not progress):
            metric.update(images.to(device), real=real)
            counts[real] += len(names_read)
        if counts[real] < 2:
            raise UsageError(f"'{folder}' has {counts[real]} readable image(s); a Frechet distance needs at least 2")
    return float(metric.compute()), counts[True], counts[False]


def evaluator_fid(evaluator, real_folder, fake_folder, batch_size=256, progress=True, names=None):
    """Frechet distance between two folders (or their images ``names``) in the tiny-sd evaluator's
    feature space; returns (distance, images in real, images in fake)."""
    device = next(evaluator.parameters()).device
    return frechet_distance(_fid_metric(EvaluatorFeatures(evaluator)), real_folder, fake_folder, batch_size,
                            size=SIZE, device=device, progress=progress, names=names)
