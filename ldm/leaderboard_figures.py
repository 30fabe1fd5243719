"""The benchmark leaderboard's figures, drawn from its table (``ldm.leaderboard``): efficacy against specificity
per concept (``leaderboard.png``), attack success before and after each attack (``leaderboard-attacks.png``) and
each erase's cost (``leaderboard-cost.png``). The docs' figures are drawn by the same functions from
``docs/results/leaderboard.csv``."""
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

from ldm.erasure import methods
from ldm.plots import plt, save_figure


MARKERS = "osD^vP*Xh<>p"


def _styles(names):
    """One color and marker per method, the same in every figure: the benchmarked methods first, in the registry's
    order, then any other."""
    order = list(dict.fromkeys([*methods.benchmarked(), *methods.METHODS, *names]))
    palette = plt.get_cmap("tab10").colors
    return {name: (palette[order.index(name) % len(palette)], MARKERS[order.index(name) % len(MARKERS)])
            for name in names}


def _errors(values, lows, highs):
    """Matplotlib's (2, n) error lengths; 0 where an interval was not recorded."""
    values, lows, highs = (np.asarray(x, dtype=float) for x in (values, lows, highs))
    return np.nan_to_num(np.stack([values - lows, highs - values]), nan=0.0).clip(min=0)


def _column(table, name):
    return table[name] if name in table else pd.Series(np.nan, index=table.index)


def panel_grid(count, width, height, columns=3):
    """A figure of ``count`` panels, at most ``columns`` a row (unused ones hidden), and its panels in order."""
    rows, columns = -(-count // columns), min(count, columns)
    figure, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    for axis in axes.flat[count:]:
        axis.set_visible(False)
    return figure, list(axes.flat[:count])


def efficacy_figure(table, path, title, found_bar=0.10, loss_bar=3.0):
    """Efficacy against specificity, one panel per concept: the share of images still showing the concept
    (95% Wilson interval) against the points lost on the other values of its attribute (95% bootstrap interval).
    The best method sits lowest and leftmost, inside the shaded target (found <= 10%, <= 3 points lost); each
    legend entry adds the points lost on the other attributes."""
    concepts = list(dict.fromkeys(table.concept))
    styles = _styles(list(dict.fromkeys(table.method)))
    figure, axes = panel_grid(len(concepts), 5.4, 6.0)
    for axis, concept in zip(axes, concepts):
        rows = table[table.concept == concept]
        loss = -rows.specificity_same.to_numpy(float)
        found = 100 * rows.efficacy.to_numpy(float)
        loss_err = _errors(loss, -_column(rows, "specificity_same_high"), -_column(rows, "specificity_same_low"))
        found_err = _errors(found, 100 * _column(rows, "efficacy_low"), 100 * _column(rows, "efficacy_high"))
        axis.fill_between([-loss_bar, loss_bar], -1, 100 * found_bar, color="tab:green", alpha=0.15,
                          label=f"target: found <= {found_bar:.0%}, <= {loss_bar:g} points lost")
        for k, (_, row) in enumerate(rows.iterrows()):
            if np.isnan(loss[k]):
                continue
            color, marker = styles[row.method]
            lost = 0.0 - row.specificity_other  # 0.0 - x: never "-0.0"
            other = "" if pd.isna(lost) else f" (other attributes: {lost:.1f} lost)"
            axis.errorbar(loss[k], found[k], xerr=loss_err[:, k:k + 1], yerr=found_err[:, k:k + 1], fmt=marker,
                          color=color, markerfacecolor="none", markeredgewidth=2, markersize=13 - 1.5 * k, capsize=3,
                          label=f"{row.method}{other}")
        axis.set_xscale("symlog", linthresh=3, linscale=0.8)
        axis.set_yscale("symlog", linthresh=10, linscale=1.5)
        right = max(10, float(np.nanmax(loss + loss_err[1], initial=0)) * 1.5)
        axis.set_xticks([t for t in (-3, 0, 3, 10, 30, 100) if t <= right])
        axis.set_yticks([0, 2, 5, 10, 20, 50, 100])
        for ticks in (axis.xaxis, axis.yaxis):
            ticks.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        axis.set_xlim(min(-loss_bar - 1, float(np.nanmin(loss - loss_err[0], initial=0)) - 1), right)
        axis.set_ylim(-0.5, 105)
        axis.set(title=f"erasing '{concept}'", xlabel="points lost on the other values of its attribute (better: left)",
                 ylabel="% of images still showing it (better: low)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    figure.suptitle(title, fontsize=9)
    return save_figure(figure, path)


def attack_figure(table, path, title):
    """ASR before and after each attack (95% Wilson intervals), grouped by method, one panel per concept."""
    concepts = list(dict.fromkeys(table.concept))
    bars = [("asr_pre", "before attack", "0.75"), ("asr_post", "after UnlearnDiffAtk", "tab:orange"),
            ("ringabell_asr_post", "after Ring-A-Bell", "tab:red"),
            ("ti_asr_post", "after textual inversion", "tab:purple")]
    figure, axes = panel_grid(len(concepts), 5.2, 4.0)
    for axis, concept in zip(axes, concepts):
        rows = table[table.concept == concept]
        positions = np.arange(len(rows))
        for k, (name, label, color) in enumerate(bars):
            values = 100 * _column(rows, name)
            errors = _errors(values, 100 * _column(rows, f"{name}_low"), 100 * _column(rows, f"{name}_high"))
            axis.bar(positions + (k - 1.5) * 0.2, values, 0.2, yerr=errors, capsize=2, color=color, label=label)
        axis.set_xticks(positions, rows.method)
        axis.set(title=f"attacking '{concept}'", ylabel="attack success rate, % of images (better: low)", ylim=(0, 105))
        axis.grid(axis="y", alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(title, fontsize=9)
    return save_figure(figure, path)


def cost_figure(table, path, title):
    """Each erase's wall time and peak memory, grouped by method, one bar per concept."""
    names = list(dict.fromkeys(table.method))
    concepts = list(dict.fromkeys(table.concept))
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / len(concepts)
    for axis, (column, label) in zip(axes, (("seconds", "erase wall time, s"), ("peak_mb", "peak memory, MB"))):
        for k, concept in enumerate(concepts):
            rows = table[table.concept == concept].set_index("method").reindex(names)
            axis.bar(np.arange(len(names)) + (k - (len(concepts) - 1) / 2) * width, rows[column], width, label=concept)
        axis.set_xticks(np.arange(len(names)), names)
        axis.set(ylabel=label + " (better: low)")
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle(textwrap.fill(title, 120), fontsize=9)  # two panels: too narrow for the title on one line
    return save_figure(figure, path)


FIGURES = {"leaderboard.png": efficacy_figure, "leaderboard-attacks.png": attack_figure,
           "leaderboard-cost.png": cost_figure}


def save_figures(table, folder, title):
    """The leaderboard's three figures under ``folder``: efficacy against specificity (``leaderboard.png``),
    attacks and cost; returns their paths."""
    return [draw(table, Path(folder) / name, title) for name, draw in FIGURES.items()]
