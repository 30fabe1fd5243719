"""Scoring folders of generated images: listing, reading, classifying, accuracy against prompts."""
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ldm.data.concepts import ATTRIBUTES, SIZE
from ldm.evaluator import HEADS, classify
from ldm.util import UsageError

IMAGE_NAME = re.compile(r"^(?P<case>-?\d+)_(?P<sample>\d+)\.(png|jpe?g|webp)$", re.IGNORECASE)


def list_images(folder):
    """Images named ``{case_number}_{i}.{png,jpg}`` in ``folder``, sorted, as a DataFrame."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"image folder '{folder}' not found")
    rows = [{"case_number": int(m["case"]), "sample": int(m["sample"]), "image": p.name}
            for p in folder.iterdir() if (m := IMAGE_NAME.match(p.name))]
    if not rows:
        raise UsageError(f"'{folder}' holds no images named <case_number>_<i>.png; "
                         "generate some with eval-scripts/generate-images.py")
    return pd.DataFrame(rows).sort_values(["case_number", "sample"]).reset_index(drop=True)


def read_images(folder, names, size=None):
    """Read images as RGB uint8; returns (array of the readable ones, their names, unreadable names)."""
    images, ok, bad = [], [], []
    for name in names:
        try:
            with Image.open(Path(folder) / name) as image:
                image = image.convert("RGB")
                if size is not None and image.size != (size, size):
                    image = image.resize((size, size), Image.BICUBIC)
                images.append(np.asarray(image))
            ok.append(name)
        except (OSError, ValueError):
            bad.append(name)
    return images, ok, bad


def classify_folder(model, folder, batch_size=256, topk=1):
    """One row per image: ``pred_<head>`` and ``prob_<head>`` for object, color and style (and the
    top-k names with ``topk`` > 1). Unreadable images get a row with ``error`` set."""
    table = list_images(folder)
    results = []
    for start in range(0, len(table), batch_size):
        chunk = table.iloc[start:start + batch_size]
        images, ok, bad = read_images(folder, chunk["image"], size=SIZE)
        predictions = classify(model, np.stack(images)) if images else {}
        for k, name in enumerate(ok):
            row = {"image": name}
            for head in HEADS:
                names, probs = predictions[head]
                row[f"pred_{head}"], row[f"prob_{head}"] = names[k], float(probs[k].max())
                if topk > 1:
                    order = np.argsort(-probs[k])[:topk]
                    row[f"top{topk}_{head}"] = "|".join(ATTRIBUTES[head][i] for i in order)
            results.append(row)
        results.extend({"image": name, "error": "unreadable"} for name in bad)
    return table.merge(pd.DataFrame(results), on="image", how="left")


def incomplete_images(results, prompts, num_samples):
    """Per prompt whose images are not all there and readable: ``case_number``, ``prompt``, how many are
    ``missing`` of ``num_samples`` and how many are ``unreadable`` (``results``: ``classify_folder``'s table)."""
    unreadable = results[results["error"].notna()] if "error" in results else results.iloc[:0]
    found = results.groupby("case_number").size()
    bad = unreadable.groupby("case_number").size()
    rows = []
    for row in prompts.itertuples():
        missing = max(0, num_samples - int(found.get(row.case_number, 0)))
        broken = int(bad.get(row.case_number, 0))
        if missing or broken:
            rows.append({"case_number": row.case_number, "prompt": row.prompt, "missing": missing,
                         "unreadable": broken})
    return pd.DataFrame(rows, columns=["case_number", "prompt", "missing", "unreadable"])


def expected_samples(folder, results):
    """Images per prompt the folder should hold: its ``generation.json``'s ``num_samples``, else the most any
    prompt has."""
    record = Path(folder) / "generation.json"
    if record.is_file():
        return int(json.loads(record.read_text())["num_samples"])
    return int(results.groupby("case_number").size().max())


def correct_table(results, prompts):
    """One row per (image, attribute named by its prompt): ``case_number``, ``sample``, ``attribute``, the
    prompt's ``truth`` and whether the prediction agreed (``correct``, 0.0 or 1.0). ``prompts`` gives the
    truth in object/color/style columns; attributes it has no column for are left out, as are images
    without a prediction (unreadable)."""
    truth = prompts.set_index("case_number")
    rows = []
    for head in HEADS:
        if head not in truth:
            continue
        expected = results["case_number"].map(truth[head].fillna("").astype(str))
        named = (expected != "") & results[f"pred_{head}"].notna()
        part = results.loc[named, ["case_number", "sample"]].copy()
        part["attribute"], part["truth"] = head, expected[named]
        part["correct"] = (results.loc[named, f"pred_{head}"] == expected[named]).astype(float)
        rows.append(part)
    if not rows:
        return pd.DataFrame(columns=["case_number", "sample", "attribute", "truth", "correct"])
    return pd.concat(rows, ignore_index=True)


def accuracy_by_attribute(correct):
    """Per attribute of a ``correct_table``: images, correct, accuracy and its 95% Wilson interval."""
    table = correct.groupby("attribute", sort=False)["correct"].agg(images="size", correct="sum").reset_index()
    table["correct"] = table["correct"].astype(int)
    table["accuracy"] = table["correct"] / table["images"]
    table[["ci95_low", "ci95_high"]] = [wilson_interval(int(c), int(n)) for c, n in zip(table["correct"], table["images"])]
    return table


def wilson_interval(successes, trials, z=1.96):
    """Wilson score interval for a proportion (95% with z = 1.96): (low, high); (nan, nan) for no trials.

    It treats the images as independent draws; images of one prompt share the prompt, so read the
    interval as a lower bound on the uncertainty over prompts."""
    if trials == 0:
        return float("nan"), float("nan")
    p = successes / trials
    denominator = 1 + z**2 / trials
    centre = (p + z**2 / (2 * trials)) / denominator
    half = z * np.sqrt(p * (1 - p) / trials + z**2 / (4 * trials**2)) / denominator
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the ends, where rounding would cut
    high = 1.0 if successes == trials else min(1.0, centre + half)  # the estimate itself out of the interval
    return float(low), float(high)


def seed_diversity(folder, table, min_difference=1.0):
    """How much the images of one prompt differ across seeds.

    ``table`` lists the images (``case_number``, ``image``), e.g. from ``list_images``. For every case
    with two or more readable images: the mean absolute pixel difference (0-255) over all pairs, and
    whether every pair differs by more than ``min_difference``. Returns one row per case.
    """
    rows = []
    for case, group in table.groupby("case_number"):
        if len(group) < 2:  # one image per prompt (I2P, COCO): nothing to compare, nothing to read
            continue
        images, _, _ = read_images(folder, group["image"])
        if len(images) < 2:
            continue
        stack = np.stack(images).astype(np.float32)
        pairs = [np.abs(stack[i] - stack[j]).mean() for i in range(len(stack)) for j in range(i + 1, len(stack))]
        rows.append({"case_number": case, "images": len(stack), "mean_pair_difference": float(np.mean(pairs)),
                     "all_distinct": bool(min(pairs) > min_difference)})
    return pd.DataFrame(rows, columns=["case_number", "images", "mean_pair_difference", "all_distinct"])
