"""What an erase leaves besides its edit, for a researcher to look at: the loss curve and a before/after grid."""
import contextlib
from pathlib import Path

import torch

from ldm.data.prompt_sets import all_concepts, concept_prompts
from ldm.generate import generate_grid
from ldm.plots import save_image_grid, save_loss_plot
from ldm.util import atomic_path

GENERIC_PROMPTS = ("a photo of a dog on the beach", "a painting of a lighthouse at dusk", "a city street at night")


def write_losses(run_dir, losses, title="loss"):
    """``loss.txt`` (one loss per iteration) and ``loss.png``."""
    with atomic_path(Path(run_dir) / "loss.txt") as tmp:
        tmp.write_text("".join(f"{x}\n" for x in losses))
    save_loss_plot(range(1, len(losses) + 1), losses, Path(run_dir) / "loss.png", title=title,
                   smooth=max(1, min(50, len(losses) // 5)))


def comparison_prompts(words, others=3):
    """Prompts for a before/after grid: the erased concepts, then a few unrelated prompts (tiny-sd
    concepts get tiny-sd prompts with and without them)."""
    if all(w in all_concepts() for w in words):
        erased, unrelated = [], []
        for word in words[:2]:
            table = concept_prompts(word)
            erased += table[table.set == "alone"].prompt.tolist()[:1] + table[table.set == "with_others"].prompt.tolist()[:1]
            unrelated += table[table.set == "without"].prompt.tolist()[:others]
        return erased + unrelated[:others]
    return list(words[:3]) + list(GENERIC_PROMPTS[:others])


@torch.no_grad()
def save_before_after_grid(model, without_edit, prompts, path, seeds=(0, 1), **generate_kwargs):
    """A grid of ``prompts`` (rows) for the base and the edited model (columns, per seed).

    ``without_edit``: a context manager (``ErasureTrainer.without_edit``) within which ``model`` draws as
    the base model, so a single model serves both.
    """
    columns = []
    for label in ("before", "after"):
        with (without_edit() if label == "before" else contextlib.nullcontext()):
            for seed in seeds:
                images = generate_grid(model, [[p] for p in prompts], seed=seed * 1000, **generate_kwargs)
                columns.append((f"{label} (seed {seed})", images[:, 0]))
    images = torch.stack([torch.from_numpy(c[1]) for c in columns], dim=1).numpy()
    return save_image_grid(images, path, row_labels=list(prompts), col_labels=[c[0] for c in columns],
                           title="before / after erasure")
