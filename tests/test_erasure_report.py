"""The erasure report's arithmetic on hand-made predictions (the real prompt set for 'circle')."""
import pandas as pd
import pytest

from ldm.data.prompt_sets import concept_prompts
from ldm.erasure.report import erasure_summary, format_summary, per_concept_accuracy


def predictions(prompts, wrong_object=lambda truth: False):
    """Perfect predictions, except objects for which ``wrong_object(truth)`` holds."""
    rows = []
    for row in prompts.itertuples(index=False):
        obj = row.object if isinstance(row.object, str) and row.object else "circle"
        rows.append({"case_number": row.case_number, "sample": 0,
                     "pred_object": "square" if wrong_object(obj) else obj,
                     "pred_color": row.color if isinstance(row.color, str) and row.color else "red",
                     "pred_style": row.style if isinstance(row.style, str) and row.style else "none"})
    return pd.DataFrame(rows)


def test_summary_separates_efficacy_from_specificity():
    prompts = concept_prompts("circle")
    base = predictions(prompts)
    edited = predictions(prompts, wrong_object=lambda obj: obj in ("circle", "star"))
    table = erasure_summary("circle", base, edited, prompts).set_index("measure")
    erased = table.loc["object 'circle' (erased)"]
    assert erased.base == 1.0 and erased.edited == 0.0
    others = table.filter(like="other objects", axis=0).iloc[0]
    assert others.base == 1.0 and others.edited == pytest.approx(6 / 7)  # star lost, 6 of 7 others intact
    assert table.loc["color (all prompts)"].change_points == 0
    per_concept = per_concept_accuracy(edited, prompts).set_index(["attribute", "concept"])
    assert per_concept.loc[("object", "star"), "accuracy"] == 0 and per_concept.loc[("object", "moon"), "accuracy"] == 1
    assert "| object 'circle' (erased) | 100.0% | 0.0% | -100.0 |" in format_summary(table.reset_index())
