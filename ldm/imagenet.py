"""ImageNet classification with torchvision's ResNet-50 (ESD's object-erasure evaluation), offline."""
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ldm.evaluation import list_images, read_images
from ldm.util import UsageError


def load_resnet50(device):
    """torchvision's ResNet-50 with ImageNet weights from the local torch cache (never downloaded)."""
    try:
        from torchvision.models import ResNet50_Weights, resnet50
    except ImportError:
        raise UsageError("the ResNet-50 classifier needs torchvision: pip install a torchvision built for this "
                         "torch version") from None
    weights = ResNet50_Weights.IMAGENET1K_V1  # torchvision's pretrained=True, as ESD used
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.is_file():
        raise UsageError(f"ResNet-50 ImageNet weights not found: put {Path(weights.url).name} (from {weights.url}) "
                         f"at {path}")
    model = resnet50()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.to(device).eval(), weights


@torch.no_grad()
def classify_folder_imagenet(folder, device, batch_size=250, topk=5):
    """ESD's columns per image: ``category_top{k}``, ``index_top{k}``, ``scores_top{k}``."""
    model, weights = load_resnet50(device)
    preprocess, categories = weights.transforms(), weights.meta["categories"]
    table = list_images(folder)
    rows = []
    for start in range(0, len(table), batch_size):
        images, ok, bad = read_images(folder, table["image"].iloc[start:start + batch_size])
        if images:
            batch = torch.stack([preprocess(torch.from_numpy(np.asarray(im)).permute(2, 0, 1)) for im in images])
            scores, indices = model(batch.to(device)).softmax(-1).topk(topk, dim=-1)
            for name, score, index in zip(ok, scores.cpu(), indices.cpu()):
                row = {"image": name}
                for k in range(topk):
                    row.update({f"category_top{k + 1}": categories[index[k]], f"index_top{k + 1}": int(index[k]),
                                f"scores_top{k + 1}": float(score[k])})
                rows.append(row)
        rows.extend({"image": name, "error": "unreadable"} for name in bad)
    return table.merge(pd.DataFrame(rows), on="image", how="left")
