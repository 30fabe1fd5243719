"""Measured erasure on tiny-sd: efficacy on the erased concept, specificity on everything else.

Both models generate the concept's prompt set (``data/tiny-sd/concepts/<concept>.csv``), the
evaluator classifies every image, and accuracies are compared per attribute and per concept.
"""
import numpy as np
import pandas as pd

from ldm.data.concepts import ATTRIBUTES
from ldm.data.prompt_sets import attribute_of
from ldm.evaluator import HEADS


def correct_table(results, prompts):
    """One row per (image, attribute named by its prompt): the truth and whether the evaluator agreed."""
    truth = prompts.set_index("case_number")
    rows = []
    for head in HEADS:
        expected = results["case_number"].map(truth[head].fillna("").astype(str))
        named = (expected != "") & results[f"pred_{head}"].notna()
        part = results.loc[named, ["case_number", "sample"]].copy()
        part["attribute"], part["truth"] = head, expected[named]
        part["correct"] = (results.loc[named, f"pred_{head}"] == expected[named]).astype(float)
        rows.append(part)
    return pd.concat(rows, ignore_index=True)


def per_concept_accuracy(results, prompts):
    """Accuracy per attribute value (every concept the prompts name)."""
    table = correct_table(results, prompts)
    return table.groupby(["attribute", "truth"], as_index=False)["correct"].mean().rename(
        columns={"truth": "concept", "correct": "accuracy"})


def erasure_summary(concept, base_results, edited_results, prompts):
    """Rows: the erased concept (efficacy), the mean over the other values of its attribute, and each
    other attribute overall (specificity); columns base, edited and the change in points."""
    attribute = attribute_of(concept)

    def summary(results):
        per_concept = per_concept_accuracy(results, prompts)
        same = per_concept[per_concept.attribute == attribute]
        rows = {f"{attribute} '{concept}' (erased)": same.loc[same.concept == concept, "accuracy"].mean(),
                f"other {attribute}s (mean of {len(same[same.concept != concept])})":
                    same.loc[same.concept != concept, "accuracy"].mean()}
        for head in HEADS:
            if head != attribute:
                rows[f"{head} (all prompts)"] = per_concept.loc[per_concept.attribute == head, "accuracy"].mean()
        return rows

    base, edited = summary(base_results), summary(edited_results)
    table = pd.DataFrame({"measure": list(base), "base": list(base.values()), "edited": list(edited.values())})
    table["change_points"] = (table["edited"] - table["base"]) * 100
    return table


def comparison_rows(prompts, per_set=3):
    """Case numbers for the side-by-side grid: a few prompts of each set (alone, with_others, without)."""
    return [int(c) for s in ("alone", "with_others", "without")
            for c in prompts.loc[prompts["set"] == s, "case_number"].head(per_set)]


def format_summary(table):
    """The summary as a Markdown table (percentages), as the README shows it."""
    lines = ["| measure | base | edited | change |", "| --- | ---: | ---: | ---: |"]
    for row in table.itertuples(index=False):
        lines.append(f"| {row.measure} | {100 * row.base:.1f}% | {100 * row.edited:.1f}% | "
                     f"{row.change_points:+.1f} |")
    return "\n".join(lines)


def known_concepts():
    """Every tiny-sd concept a report can be made for."""
    return [v for values in ATTRIBUTES.values() for v in values if v != "none"]


def stack_pairs(base_images, edited_images):
    """(rows, 2, H, W, 3) from two equally long lists of images."""
    return np.stack([np.stack([b, e]) for b, e in zip(base_images, edited_images)])
