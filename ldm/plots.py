"""PNG outputs a researcher would rather look at than read: loss curves and labelled image grids."""
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ldm.util import atomic_path  # noqa: E402


def save_figure(fig, path):
    """Write ``fig`` as a PNG atomically (a killed run never leaves half an image) and close it."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def save_loss_plot(steps, losses, path, title="training loss", smooth=50):
    """Plot raw and moving-average loss against step and save it as a PNG."""
    steps, losses = np.asarray(steps), np.asarray(losses, dtype=float)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, alpha=0.3, label="loss")
    if len(losses) >= smooth:
        ax.plot(steps[smooth - 1:], np.convolve(losses, np.ones(smooth) / smooth, mode="valid"),
                label=f"mean of {smooth}")
    ax.set(xlabel="step", ylabel="loss", title=title, yscale="log")
    ax.legend()
    return save_figure(fig, path)


def save_image_grid(images, path, row_labels=None, col_labels=None, title=None, scale=2):
    """Save a grid of uint8 images (rows x cols x H x W x 3) with optional row and column labels."""
    images = np.asarray(images)
    rows, cols = images.shape[:2]
    height, width = images.shape[2:4]
    fig, axes = plt.subplots(rows, cols, figsize=(cols * width * scale / 100 + 1, rows * height * scale / 100 + 0.6),
                             squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(images[r, c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 and col_labels is not None:
                ax.set_title(col_labels[c], fontsize=8)
            if c == 0 and row_labels is not None:  # wrapped: a long prompt must not run into its neighbours
                ax.set_ylabel("\n".join(textwrap.wrap(row_labels[r], 20)), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def save_bar_chart(labels, series, path, title=None, xlabel="images"):
    """Horizontal grouped bars: ``series`` maps a legend name to one value per label (first on top)."""
    labels = list(labels)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) * max(1, len(series)) + 1.2))
    height = 0.8 / max(1, len(series))
    positions = np.arange(len(labels))
    for k, (name, values) in enumerate(series.items()):
        bars = ax.barh(positions + k * height, values, height=height, label=name)
        ax.bar_label(bars, fontsize=8, padding=2)
    ax.set_yticks(positions + height * (len(series) - 1) / 2, labels)
    ax.invert_yaxis()
    ax.set(xlabel=xlabel, title=title)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if len(series) > 1:
        ax.legend()
    return save_figure(fig, path)
