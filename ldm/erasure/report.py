"""Measured erasure on tiny-sd: efficacy on the erased concept, specificity on everything else.

Both models generate the concept's prompt set (``data/tiny-sd/concepts/<concept>.csv``) from the same
start noise, the evaluator classifies every image, and accuracies are compared per prompt set,
attribute and concept, each with its image count and 95% interval. Efficacy counts only prompts that
name the concept; specificity only prompts that do not, so the intended edit is never counted as
collateral damage.
"""
import numpy as np
import pandas as pd
import torch

from ldm.data.concepts import ATTRIBUTES
from ldm.data.prompt_sets import attribute_of
from ldm.erasure.methods import ESD_BARS
from ldm.evaluation import correct_table, wilson_interval
from ldm.evaluator import HEADS
from ldm.generate import generate, latent_shape, seeded_noise


def per_concept_accuracy(results, prompts):
    """Accuracy per attribute value (every concept the prompts name)."""
    table = correct_table(results, prompts)
    return table.groupby(["attribute", "truth"], as_index=False)["correct"].mean().rename(
        columns={"truth": "concept", "correct": "accuracy"})


def paired_table(base_results, edited_results, prompts):
    """Per (image, named attribute): the truth, the prompt set and whether base and edited model agreed
    with the truth. Images are paired by case and sample (the same start noise for both models)."""
    sets = prompts.set_index("case_number")["set"] if "set" in prompts else None
    base = correct_table(base_results, prompts)
    edited = correct_table(edited_results, prompts)
    table = base.merge(edited, on=["case_number", "sample", "attribute", "truth"], suffixes=("_base", "_edited"))
    table["set"] = table["case_number"].map(sets) if sets is not None else "all"
    return table


def _per_case(rows):
    """Per prompt (case) and truth value: correct counts of both models and image counts, as arrays
    (cases, values)."""
    cases, case_index = np.unique(rows["case_number"], return_inverse=True)
    values, value_index = np.unique(rows["truth"], return_inverse=True)
    shape = (len(cases), len(values))
    counts = np.zeros(shape)
    np.add.at(counts, (case_index, value_index), 1)
    correct = {}
    for column in ("correct_base", "correct_edited"):
        correct[column] = np.zeros(shape)
        np.add.at(correct[column], (case_index, value_index), rows[column].to_numpy(float))
    return counts, correct


def _statistic(weights, counts, correct, mean_over_truth):
    """Accuracy for case weights (B, cases): pooled over images, or the mean of per-truth accuracies."""
    if not mean_over_truth:
        return (weights @ correct.sum(1)) / (weights @ counts.sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nanmean((weights @ correct) / (weights @ counts), axis=1)


def _estimate(rows, mean_over_truth, samples, rng):
    """(base, edited, change interval in points): the accuracies, and the 95% percentile interval of their
    difference when the prompts are resampled with replacement (images of one prompt move together, and
    both models' images of a prompt, made from the same noise, stay paired)."""
    counts, correct = _per_case(rows)
    ones = np.ones((1, len(counts)))
    base, edited = (float(_statistic(ones, counts, correct[c], mean_over_truth)[0])
                    for c in ("correct_base", "correct_edited"))
    # resample prompts within each truth value (a prompt names one value of the attribute), so that every
    # value stays in every draw; for a pooled figure all prompts form one stratum
    strata = counts.argmax(1) if mean_over_truth else np.zeros(len(counts), dtype=int)
    weights = np.zeros((samples, len(counts)))
    for stratum in np.unique(strata):
        members = np.flatnonzero(strata == stratum)
        draws = members[rng.integers(0, len(members), (samples, len(members)))]
        for k in range(samples):
            weights[k] += np.bincount(draws[k], minlength=len(counts))
    change = (_statistic(weights, counts, correct["correct_edited"], mean_over_truth)
              - _statistic(weights, counts, correct["correct_base"], mean_over_truth))
    return base, edited, np.nanpercentile(change, [2.5, 97.5]) * 100


def _summary_row(key, group, measure, subset, bootstrap, rng, mean_over_truth=False):
    """One report row: its stable key, image count, base and edited accuracy with Wilson 95% intervals, the
    change in points with its bootstrap 95% interval."""
    base, edited, (low, high) = _estimate(subset, mean_over_truth, bootstrap, rng)
    n = len(subset)
    base_ci = wilson_interval(int(subset["correct_base"].sum()), n)
    edited_ci = wilson_interval(int(subset["correct_edited"].sum()), n)
    return {"group": group, "measure": measure, "key": key, "prompts": subset["case_number"].nunique(), "images": n,
            "base": base, "base_low": base_ci[0], "base_high": base_ci[1],
            "edited": edited, "edited_low": edited_ci[0], "edited_high": edited_ci[1],
            "change_points": (edited - base) * 100, "change_low": low, "change_high": high}


def _summary(specs, bootstrap, seed, bars):
    """Rows for (key, group, measure, subset, mean_over_truth) specs, empty subsets skipped, with each row's
    bar (from ``bars``, by group) and verdict. ``measure`` is the label people read; ``key`` the name programs
    read a figure by (see ``erasure_summary``), which no rewording of a label changes."""
    rng = np.random.default_rng(seed)
    summary = pd.DataFrame([_summary_row(key, group, measure, subset, bootstrap, rng, mean_over_truth)
                            for key, group, measure, subset, mean_over_truth in specs if not subset.empty])
    summary["bar"] = summary["group"].map(bars)
    summary["verdict"] = [verdict(row) for row in summary.itertuples(index=False)]
    return summary


def erasure_summary(concept, base_results, edited_results, prompts, bootstrap=1000, seed=0, bars=ESD_BARS):
    """The report's rows, each with its image count, base and edited accuracy (Wilson 95% intervals), the
    change in points (95% interval by bootstrapping prompts) and a verdict against its bar.

    - efficacy: how often the erased concept is still found, on prompts naming it, per prompt set
      (``alone``, ``with_others``) and combined;
    - specificity, only on prompts that do not name the concept (set ``without``): each other value of
      its attribute, their mean, and each other attribute.

    Keys: ``found_alone``, ``found_with_others``, ``found_combined`` (or ``found_named`` for a prompt file
    without sets), ``same_value:<value>``, ``same_attribute`` (their mean), ``other_attribute:<attribute>``.
    """
    attribute = attribute_of(concept)
    table = paired_table(base_results, edited_results, prompts)
    specs = []
    named = table[(table.attribute == attribute) & (table.truth == concept)]
    if "set" in prompts:
        for name in ("alone", "with_others"):
            specs.append((f"found_{name}", "efficacy", f"'{concept}' found, {name}", named[named.set == name], False))
        specs.append(("found_combined", "efficacy", f"'{concept}' found, combined",
                      named[named.set.isin(["alone", "with_others"])], False))
    else:  # a prompt file without sets: every prompt that names the concept
        specs.append(("found_named", "efficacy", f"'{concept}' found, prompts naming it", named, False))

    without = table[table.set == "without"] if "set" in prompts else table[~table.case_number.isin(named.case_number)]
    same = without[(without.attribute == attribute) & (without.truth != concept)]
    for value in sorted(same.truth.unique(), key=ATTRIBUTES[attribute].index):
        specs.append((f"same_value:{value}", "same attribute", f"{attribute} '{value}'", same[same.truth == value],
                      False))
    specs.append(("same_attribute", "same attribute", f"other {attribute}s (mean of {same.truth.nunique()})", same,
                  True))
    for head in HEADS:
        if head != attribute:
            specs.append((f"other_attribute:{head}", "other attributes", f"{head} (mean over values)",
                          without[without.attribute == head], True))
    return _summary(specs, bootstrap, seed, bars)


def found_table(base_results, edited_results, prompts, concept):
    """Per image: whether each model drew ``concept`` (``correct_base``/``correct_edited`` mean "found"),
    whatever the prompt names; images paired by case and sample, with the prompt's set."""
    head = f"pred_{attribute_of(concept)}"
    table = base_results[["case_number", "sample", head]].merge(
        edited_results[["case_number", "sample", head]], on=["case_number", "sample"], suffixes=("_base", "_edited"))
    table["truth"] = concept
    for role in ("base", "edited"):
        table[f"correct_{role}"] = (table[f"{head}_{role}"] == concept).astype(float)
    table["set"] = table["case_number"].map(prompts.set_index("case_number")["set"])
    return table


def attribute_erasure_summary(concept, erase_from, base_results, edited_results, prompts, bootstrap=1000, seed=0,
                              bars=ESD_BARS):
    """The report of ``--prompt concept --erase_from erase_from`` on ``attribute_erasure_prompts`` sets:

    - efficacy: how often ``concept`` is drawn on prompts with ``erase_from`` (set ``from``: its attribute
      not named, the model picks it; ``from_named``: named);
    - kept elsewhere: how often it is drawn with the other values of ``erase_from``'s attribute
      (``elsewhere``, ``elsewhere_named``): a drop there is collateral;
    - other attributes: ``erase_from`` itself on its prompts, and the third attribute where named.

    Keys: ``found_from``, ``found_from_named``, ``kept_elsewhere``, ``kept_elsewhere_named``,
    ``erase_from_kept``, ``other_attribute:<attribute>``.
    """
    found = found_table(base_results, edited_results, prompts, concept)
    table = paired_table(base_results, edited_results, prompts)
    b_attribute = attribute_of(erase_from)
    on_b = table[table.set.isin(["from", "from_named"]) & (table.attribute == b_attribute)]
    third = next(k for k in HEADS if k not in (attribute_of(concept), b_attribute))
    specs = [(f"found_{name}", "efficacy", f"'{concept}' found, {name}", found[found.set == name], False)
             for name in ("from", "from_named")]
    specs += [(f"kept_{name}", "kept elsewhere", f"'{concept}' found, {name}", found[found.set == name], False)
              for name in ("elsewhere", "elsewhere_named")]
    specs.append(("erase_from_kept", "other attributes", f"{b_attribute} '{erase_from}' on its prompts", on_b, False))
    specs.append((f"other_attribute:{third}", "other attributes", f"{third} (mean over values)",
                  table[table.attribute == third], True))
    return _summary(specs, bootstrap, seed, bars)


def verdict(row):
    """'met' or 'not met' where the 95% interval is wholly on one side of the row's bar, 'undecided'
    where it straddles it; '' for rows without a bar (single values of the erased attribute)."""
    bar = row.bar
    if row.group == "efficacy":
        return "met" if row.edited_high <= bar else "not met" if row.edited_low > bar else "undecided"
    if row.group == "same attribute" and row.key != "same_attribute":
        return ""
    return "met" if row.change_low >= -bar else "not met" if row.change_high < -bar else "undecided"


def comparison_rows(prompts, per_set=3):
    """Case numbers for the side-by-side grid: a few prompts of each set, in the file's order (alone,
    with_others, without), or the first few of a prompt file without sets."""
    if "set" not in prompts:
        return [int(c) for c in prompts["case_number"].head(3 * per_set)]
    return [int(c) for s in prompts["set"].unique()
            for c in prompts.loc[prompts["set"] == s, "case_number"].head(per_set)]


def format_summary(table):
    """The summary as a Markdown table (percentages with 95% intervals), as the docs show it."""
    lines = ["| measure | prompts | images | base | edited | change (points) | bar | verdict |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for row in table.itertuples(index=False):
        bar = "" if not row.verdict else f"found <= {row.bar:.0%}" if row.group == "efficacy" else f"drop <= {row.bar:g}"
        lines.append(f"| {row.measure} | {row.prompts} | {row.images} | {100 * row.base:.1f}% "
                     f"[{100 * row.base_low:.0f}, {100 * row.base_high:.0f}] | {100 * row.edited:.1f}% "
                     f"[{100 * row.edited_low:.0f}, {100 * row.edited_high:.0f}] | {row.change_points:+.1f} "
                     f"[{row.change_low:+.1f}, {row.change_high:+.1f}] | {bar} | {row.verdict} |")
    return "\n".join(lines)


def stack_pairs(base_images, edited_images):
    """(rows, 2, H, W, 3) from two equally long lists of images."""
    return np.stack([np.stack([b, e]) for b, e in zip(base_images, edited_images)])


def _key_value_projections(model):
    """The cross-attention ``to_k``/``to_v`` modules, called (not their weights read) so that an edit made
    by forward hooks (CPE's ResAGs) is in what they return."""
    return {n: m for n, m in model.model.diffusion_model.named_modules()
            if n.endswith("attn2.to_k") or n.endswith("attn2.to_v")}


@torch.no_grad()
def preservation_table(base, edited, prompts, seeds=(0, 1, 2, 3), guidance_scale=7.5, ddim_steps=50, batch_size=32):
    """Per prompt, how exactly ``edited`` keeps ``base`` (two CompVis models): the largest absolute
    difference of any cross-attention key/value (fp32) over every context token, and the largest pixel
    difference (0-255) of the images both draw from the same start noise, one per seed."""
    base_kv, edited_kv = _key_value_projections(base), _key_value_projections(edited)
    seeds = list(seeds)
    jobs = [(prompt, seed) for prompt in prompts for seed in seeds]
    x_T = seeded_noise([seed for _, seed in jobs], latent_shape(base))

    def draw(model):
        return np.concatenate([generate(model, [p for p, _ in jobs[i:i + batch_size]], x_T[i:i + batch_size],
                                        guidance_scale, ddim_steps) for i in range(0, len(jobs), batch_size)]).astype(int)

    difference = np.abs(draw(base) - draw(edited)).reshape(len(prompts), len(seeds), -1)
    context_base = base.get_learned_conditioning(list(prompts)).float()
    context_edited = edited.get_learned_conditioning(list(prompts)).float()
    rows = []
    for i, prompt in enumerate(prompts):
        kv = max((edited_kv[n](context_edited[i:i + 1]).float() - base_kv[n](context_base[i:i + 1]).float())
                 .abs().max().item() for n in base_kv)
        rows.append({"prompt": prompt, "key_value_max_abs_diff": kv, "images": len(seeds),
                     "pixel_max_abs_diff": int(difference[i].max()), "pixels_differing": float((difference[i] > 0).mean())})
    return pd.DataFrame(rows)
