"""The erasure report's arithmetic on hand-made predictions (the real prompt set for 'circle')."""
import json
import shutil

import pandas as pd
import pytest
import torch

from ldm.data.prompt_sets import attribute_erasure_prompts, concept_prompts
from ldm.erasure import methods
from ldm.erasure.report import attribute_erasure_summary, erasure_summary, format_summary, per_concept_accuracy
from ldm.evaluation import wilson_interval

from conftest import TINY, call_script, one_line_error


def predictions(prompts, samples=4, wrong_object=lambda truth, row, sample: False, wrong_color=lambda row: False):
    """Perfect predictions, except objects and colors the callables say are misread."""
    rows = []
    for row in prompts.itertuples(index=False):
        obj = row.object if isinstance(row.object, str) and row.object else "circle"
        color = row.color if isinstance(row.color, str) and row.color else "red"
        for sample in range(samples):
            rows.append({"case_number": row.case_number, "sample": sample,
                         "pred_object": "square" if wrong_object(obj, row, sample) else obj,
                         "pred_color": "pink" if wrong_color(row) else color,
                         "pred_style": row.style if isinstance(row.style, str) and row.style else "none"})
    return pd.DataFrame(rows)


def test_efficacy_is_per_set_and_specificity_only_on_prompts_without_the_concept():
    prompts = concept_prompts("circle")
    base = predictions(prompts, samples=10)
    # erased everywhere on 'alone', half the samples of 'with_others'; 'star' lost as collateral; the
    # color of prompts that name the circle changes too, which is the intended edit, not collateral
    edited = predictions(prompts, samples=10, wrong_object=lambda obj, row, sample: obj == "star" or (
        obj == "circle" and (row.set == "alone" or sample % 2 == 0)), wrong_color=lambda row: row.set != "without")
    table = erasure_summary("circle", base, edited, prompts, bootstrap=200).set_index("measure")
    alone, composed = table.loc["'circle' found, alone"], table.loc["'circle' found, with_others"]
    short = erasure_summary("circle", base[base["sample"] < 4], edited[edited["sample"] < 4], prompts, bootstrap=200)
    assert short.set_index("measure").loc["'circle' found, alone", "verdict"] == "undecided"  # 0 of 16: bound 19%
    assert alone.base == 1 and alone.edited == 0 and alone.verdict == "met"
    assert composed.edited == 0.5 and composed.verdict == "not met"
    assert alone.images == 10 * (prompts.set == "alone").sum()  # 40 images: 0 found has a 95% bound of 8.8%
    assert table.loc["'circle' found, combined"].images == alone.images + composed.images
    others = table.loc["other objects (mean of 7)"]
    assert others.base == 1 and others.edited == pytest.approx(6 / 7)  # star lost, 6 of 7 others intact
    assert others.verdict == "not met"  # a whole value lost: -14 points, whatever prompts are drawn
    assert table.loc["object 'star'"].edited == 0 and table.loc["object 'moon'"].edited == 1
    color = table.loc["color (mean over values)"]
    assert color.change_points == 0 and color.verdict == "met" and color.prompts == (prompts.set == "without").sum()
    assert "| 'circle' found, alone |" in format_summary(table.reset_index())
    per_concept = per_concept_accuracy(edited, prompts).set_index(["attribute", "concept"])
    assert per_concept.loc[("object", "moon"), "accuracy"] == 1


def test_intervals_cover_the_estimate_and_undecided_verdicts_are_said():
    prompts = concept_prompts("circle")
    base = predictions(prompts, samples=2)
    edited = predictions(prompts, samples=2, wrong_object=lambda obj, row, sample: obj == "circle" and (
        row.case_number % 5 == 0 and sample == 0))  # a few circles still found... wrongly, so found 90%-ish
    table = erasure_summary("circle", base, edited, prompts, bootstrap=200)
    assert (table.edited_low <= table.edited).all() and (table.edited <= table.edited_high).all()
    assert (table.change_low <= table.change_points + 1e-9).all() and (table.change_points <= table.change_high + 1e-9).all()
    row = table.set_index("measure").loc["'circle' found, combined"]
    assert row.verdict == "not met" and row.edited > 0.8


def test_each_method_is_judged_against_its_own_bars():
    prompts = concept_prompts("circle")
    base = predictions(prompts, samples=10)
    # 'star' lost in 3 of its 10 samples of every prompt: about -4 points over the 7 other objects
    edited = predictions(prompts, samples=10, wrong_object=lambda obj, row, sample: obj == "star" and sample < 3)
    verdicts = {name: erasure_summary("circle", base, edited, prompts, bootstrap=200, bars=methods.get(name).bars)
                .set_index("measure").loc["other objects (mean of 7)"] for name in ("esd-x", "esd-u", "sepce", "cpe", "cie")}
    assert verdicts["esd-x"].bar == 5 and verdicts["esd-x"].verdict == "met"  # -4.3 within ESD's 5 points
    assert methods.get("esd-u").bars == methods.ESD_BARS == methods.get("esd-x").bars
    assert verdicts["sepce"].bar == 3 and verdicts["sepce"].verdict == "not met"  # -4.3 beyond SepCE's 3 points
    assert verdicts["cpe"].bar == 3 and methods.get("cpe").bars["other attributes"] == 2
    assert methods.get("sepce").bars["other attributes"] == 2 and verdicts["cie"].bar == 2
    assert "| drop <= 2 | not met |" in format_summary(erasure_summary("circle", base, edited, prompts, bootstrap=200,
                                                                       bars=methods.get("cie").bars))


@pytest.mark.parametrize("concept, erase_from", [("Van Gogh", "heart"), ("red", "Seurat"), ("moon", "blue")])
def test_attribute_erasure_sets_name_what_they_say(concept, erase_from):
    prompts = attribute_erasure_prompts(concept, erase_from)
    attribute = {"Van Gogh": "style", "red": "color", "moon": "object"}[concept]
    b_attribute = {"heart": "object", "Seurat": "style", "blue": "color"}[erase_from]
    by_set = dict(tuple(prompts.groupby("set")))
    assert set(by_set) == {"from", "from_named", "elsewhere", "elsewhere_named"}
    assert (by_set["from"][b_attribute] == erase_from).all() and (by_set["from"][attribute] == "").all()
    assert (by_set["from_named"][attribute] == concept).all()
    assert not by_set["elsewhere"][b_attribute].isin([erase_from, ""]).any()
    assert (by_set["elsewhere_named"][attribute] == concept).all()
    assert by_set["elsewhere"][b_attribute].nunique() > 4  # spread over the other values
    for row in prompts.itertuples():  # every named value is in the sentence, no other concept word is
        for value in (row.object, row.color, row.style):
            assert not value or value in row.prompt
    with pytest.raises(ValueError, match="both style values"):
        attribute_erasure_prompts("Van Gogh", "Seurat")


def test_attribute_erasure_summary():
    """Van Gogh erased from hearts: gone where the heart is drawn, kept on every other object."""
    prompts = attribute_erasure_prompts("Van Gogh", "heart")
    sets = prompts.set_index("case_number")["set"]

    def drawn(erased):
        rows = []
        for row in prompts.itertuples(index=False):
            for sample in range(10):
                # where the prompt names no style, the model draws Van Gogh in 3 of 10 images
                style = row.style or ("Van Gogh" if sample < 3 else "Rothko")
                if erased and sets[row.case_number].startswith("from") and style == "Van Gogh":
                    style = "Pollock"
                rows.append({"case_number": row.case_number, "sample": sample, "pred_object": row.object,
                             "pred_color": row.color or "red", "pred_style": style})
        return pd.DataFrame(rows)

    table = attribute_erasure_summary("Van Gogh", "heart", drawn(False), drawn(True), prompts,
                                      bootstrap=200).set_index("measure")
    implicit, named = table.loc["'Van Gogh' found, from"], table.loc["'Van Gogh' found, from_named"]
    assert implicit.base == pytest.approx(0.3) and implicit.edited == 0 and implicit.verdict == "met"
    assert named.base == 1 and named.edited == 0 and named.images == 80
    for name in ("elsewhere", "elsewhere_named"):
        kept = table.loc[f"'Van Gogh' found, {name}"]
        assert kept.change_points == 0 and kept.verdict == "met" and kept.group == "kept elsewhere"
    assert table.loc["object 'heart' on its prompts"].verdict == "met"
    assert table.loc["color (mean over values)"].images == 10 * (prompts.color != "").sum()
    assert "| drop <= 5 | met |" in format_summary(table.reset_index())


def test_wilson_interval():
    low, high = wilson_interval(0, 40)
    assert low == 0 and 0.08 < high < 0.09  # 0 of 40 still allows ~8.8%
    low, high = wilson_interval(95, 100)
    assert 0.88 < low < 0.89 and 0.97 < high < 0.98


SMALL_SET = ("case_number,prompt,evaluation_seed,object,color,style,set\n"
             "0,circle,1,circle,,,alone\n1,a red circle,2,circle,red,,with_others\n2,a blue star,3,star,blue,,without\n")


def _report(run_dir, prompts, save_path, *extra):
    return call_script("eval-scripts/erasure-report.py", "--model_name", run_dir, "--prompts_path", prompts,
                      "--save_path", save_path, "--num_samples", 1, "--ddim_steps", 2, "--device", "cpu", *extra)


@pytest.mark.slow  # the same rule at the generation layer runs by default (test_identity.py)
def test_report_uses_the_retrained_runs_images(run_name, tmp_path):
    """Retrain under the same run name with a flag absent from the name (--seed): the report must use
    the new model's images, never the cached ones of the old weights."""
    prompts, save_path = tmp_path / "set.csv", tmp_path / "erasure"
    prompts.write_text(SMALL_SET)
    train = ["--prompt", "circle", "--iterations", 2, "--ddim_steps", 4, "--lr", 1e-3, "--run_name", run_name,
             "--devices", "cpu", "--no_diffusers", "--no_samples"]
    identities = []
    for seed in (0, 1):
        trained = call_script("train-scripts/train-esd.py", *train, "--seed", seed, "--overwrite")
        assert trained.returncode == 0, trained.stderr
        report = _report(run_name, prompts, save_path)
        assert report.returncode == 0, report.stderr
        assert "'circle' found, alone" in report.stdout
        identities.append(json.loads((save_path / "reports" / run_name / "models.json").read_text()))
    assert identities[0]["base"]["sha256"] == identities[1]["base"]["sha256"]  # base images reused
    assert identities[0]["edited"]["sha256"] != identities[1]["edited"]["sha256"]
    folders = sorted(p.name for p in (save_path / "images" / run_name).iterdir())
    assert len(folders) == 2  # one image folder per weights: the old one is never read for the new run
    summary = pd.read_csv(save_path / "reports" / run_name / "summary.csv")
    assert (summary["edited_sha256"] == identities[1]["edited"]["sha256"][:12]).all()


@pytest.mark.slow
def test_report_of_an_attribute_erasure_run(run_name, tmp_path):
    """A run trained with --erase_from is reported on the attribute-erasure sets, without flags."""
    save_path = tmp_path / "erasure"
    trained = call_script("train-scripts/train-esd.py", "--prompt", "Van Gogh", "--erase_from", "heart",
                          "--iterations", 1, "--ddim_steps", 4, "--run_name", run_name, "--devices", "cpu",
                          "--no_diffusers", "--no_samples")
    assert trained.returncode == 0, trained.stderr
    report = call_script("eval-scripts/erasure-report.py", "--model_name", run_name, "--save_path", save_path,
                         "--num_samples", 1, "--ddim_steps", 2, "--device", "cpu")
    assert report.returncode == 0, report.stderr
    summary = pd.read_csv(save_path / "reports" / run_name / "summary.csv")
    assert "'Van Gogh' found, from_named" in set(summary.measure)
    assert set(summary.group) == {"efficacy", "kept elsewhere", "other attributes"}
    assert (save_path / "prompts" / "van_gogh_from_heart.csv").exists()
    wrong = call_script("eval-scripts/erasure-report.py", "--model_name", run_name, "--save_path", save_path,
                        "--erase_from", "Seurat")
    assert "another attribute" in one_line_error(wrong)


def test_report_bad_input_is_one_line(tmp_path, small_config, small_config_path, small_ckpt):
    from ldm.runs import base_identity, save_trained_params, write_run_config
    prompts = tmp_path / "set.csv"
    prompts.write_text(SMALL_SET)
    assert "not a tiny-sd concept" in one_line_error(_report(TINY, prompts, tmp_path, "--concept", "giraffe"))
    assert "pass --concept" in one_line_error(_report("tiny-sd", prompts, tmp_path))
    empty = tmp_path / "empty-run"
    empty.mkdir()
    (empty / "config.yaml").write_text("model:\n  target: x\nrun:\n  prompt: circle\n")
    assert "needs config.yaml and model.ckpt" in one_line_error(_report(empty, prompts, tmp_path))  # no base_model:
    assert "needs config.yaml and model.ckpt" in one_line_error(_report(empty, prompts, tmp_path, "--concept", "circle"))
    base = tmp_path / "base.ckpt"
    shutil.copyfile(small_ckpt, base)
    run_dir = tmp_path / "moved-base"
    run_dir.mkdir()
    write_run_config(run_dir, small_config, {"method": "esd-x", "prompt": "circle"},
                     base_identity(small_config_path, base))
    save_trained_params(run_dir, {}, {"method": "esd-x"})
    state = torch.load(base, weights_only=True)
    state["state_dict"]["model.diffusion_model.out.2.bias"] += 1
    torch.save(state, base)  # the base on disk is no longer the one the run was trained on
    assert "--force_base" in one_line_error(_report(run_dir, prompts, tmp_path, "--base_model", run_dir))


@pytest.mark.slow  # an end-to-end run of the scripts: the slow tier
def test_each_concept_of_a_two_concept_run_gets_its_own_report(run_name, tmp_path):
    """Reports on the concepts of a run that erased several never overwrite each other."""
    prompts, save_path = tmp_path / "set.csv", tmp_path / "erasure"
    prompts.write_text(SMALL_SET)
    trained = call_script("train-scripts/train-cpe.py", "--prompt", "circle,star", "--seperator", ",", "--stages", 1,
                          "--iterations", 2, "--first_stage_factor", 1, "--run_name", run_name, "--no_diffusers",
                          "--no_samples")
    assert trained.returncode == 0, trained.stderr
    for concept in ("circle", "star"):
        report = _report(run_name, prompts, save_path, "--concept", concept)
        assert report.returncode == 0, report.stderr
    circle, star = (set(pd.read_csv(save_path / "reports" / f"{run_name}_{c}" / "summary.csv").measure)
                    for c in ("circle", "star"))
    assert "'circle' found, alone" in circle and "'circle' found, alone" not in star  # the set names no star alone
    assert not (save_path / "reports" / run_name).exists()
