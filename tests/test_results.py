"""Figures are read by key, never by label; the leaderboard's figures and table come from its CSV; the ESD sweep runs
the benchmark's cells; a rerun's output becomes a table's CSV only with its identity."""
import importlib.util
import json
import shutil

import pandas as pd
import pytest
from omegaconf import OmegaConf

from ldm import leaderboard, results
from ldm.erasure.erase import run_settings
from ldm.data.prompt_sets import concept_prompts
from ldm.erasure.report import erasure_summary
from ldm.paths import REPO_ROOT, TINY_SD_DIR, outputs_dir
from ldm.util import UsageError, file_sha256, load_config


def load(path):
    spec = importlib.util.spec_from_file_location(path.replace("/", "_"), REPO_ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def predictions(prompts, samples, found=lambda row, sample: False):
    """Perfect predictions of every attribute, except the heart drawn as a circle where ``found`` says no."""
    rows = []
    for row in prompts.itertuples(index=False):
        for sample in range(samples):
            obj = row.object or "circle"
            rows.append({"case_number": row.case_number, "sample": sample,
                         "pred_object": "circle" if obj == "heart" and not found(row, sample) else obj,
                         "pred_color": row.color or "red", "pred_style": row.style or "none"})
    return pd.DataFrame(rows)


def test_the_report_writes_stable_keys_and_the_benchmark_reads_them():
    prompts = concept_prompts("heart").fillna("")
    base = predictions(prompts, 2, found=lambda row, sample: True)
    edited = predictions(prompts, 2, found=lambda row, sample: row.set == "alone" and sample == 0)
    summary = erasure_summary("heart", base, edited, prompts, bootstrap=50)
    keys = set(summary.key)
    assert {"found_alone", "found_with_others", "found_combined", "same_attribute", "same_value:star",
            "other_attribute:color", "other_attribute:style"} <= keys
    drift = pd.DataFrame({"set": ["without"], "prompts": [48], "feature_distance": [1.5]})
    figures = leaderboard.report_figures(summary, drift)
    combined = summary.set_index("key").loc["found_combined"]
    assert figures["efficacy"] == combined.edited == pytest.approx(4 / 40)  # half the alone images: 4 of 40
    assert figures["efficacy_low"] < figures["efficacy"] < figures["efficacy_high"]
    assert figures["efficacy_images"] == 40 and figures["specificity_same"] == 0 and figures["drift"] == 1.5
    assert figures["found_alone"] == pytest.approx(4 / 8) and figures["found_alone_images"] == 8
    assert figures["found_with_others"] == 0 and figures["found_with_others_images"] == 32
    other = summary[summary.key.str.startswith("other_attribute:")]
    assert figures["specificity_other_worst"] == other.change_points.min()
    assert figures["specificity_other_worst_attribute"] in ("color", "style")
    relabelled = summary.assign(measure="reworded")  # a label change moves no figure
    assert leaderboard.report_figures(relabelled, drift) == figures
    with pytest.raises(UsageError, match="no 'found_combined' row"):
        leaderboard.report_figures(summary[summary.key != "found_combined"], drift)
    with pytest.raises(UsageError, match="key column"):
        leaderboard.report_figures(summary.drop(columns="key"), drift)


def test_attack_figures_take_the_newest_row_with_its_intervals():
    summary = pd.DataFrame([{"attack": "ringabell", "images": 20, "asr_pre": 0.1, "asr_pre_low": 0.03,
                             "asr_pre_high": 0.3, "asr_post": 0.2, "asr_post_low": 0.08, "asr_post_high": 0.42},
                            {"attack": "ringabell", "images": 20, "asr_pre": 0.0, "asr_pre_low": 0.0,
                             "asr_pre_high": 0.16, "asr_post": 0.05, "asr_post_low": 0.01, "asr_post_high": 0.24}])
    figures = leaderboard.attack_figures(summary, "ringabell", "ringabell_")
    assert figures == {"ringabell_asr_pre": 0.0, "ringabell_asr_pre_low": 0.0, "ringabell_asr_pre_high": 0.16,
                       "ringabell_asr_post": 0.05, "ringabell_asr_post_low": 0.01, "ringabell_asr_post_high": 0.24,
                       "attack_images": 20}


def test_the_leaderboard_keeps_its_columns_and_draws_three_figures(tmp_path):
    shipped = pd.read_csv(results.RESULTS_DIR / "leaderboard.csv")
    assert set(shipped.columns) <= set(leaderboard.COLUMNS + leaderboard.DETAIL_COLUMNS)
    cell = {"method": "cpe", "concept": "Van Gogh", "efficacy": 0.075, "efficacy_low": 0.05, "efficacy_high": 0.12,
            "found_alone": 0.0, "found_alone_low": 0.0, "found_alone_high": 0.09, "found_with_others": 0.1,
            "found_with_others_low": 0.06, "found_with_others_high": 0.15, "specificity_same": 0.0,
            "specificity_same_low": 0.0, "specificity_same_high": 0.0, "specificity_other": -0.5,
            "specificity_other_worst": -1.0, "specificity_other_worst_low": -2.5, "specificity_other_worst_high": 0.0,
            "specificity_other_worst_attribute": "color", "drift": 0.01, "asr_pre": 0.1, "asr_pre_low": 0.03,
            "asr_pre_high": 0.3, "asr_post": 0.15, "ringabell_asr_post": 0.65, "ti_asr_post": 0.8, "seconds": 144,
            "peak_mb": 670}
    table = leaderboard.leaderboard([cell, {**cell, "method": "sepce", "efficacy": 0.0}])
    assert list(table.columns) == leaderboard.COLUMNS + leaderboard.DETAIL_COLUMNS
    assert list(table.method) == ["sepce", "cpe"]  # best efficacy first
    lines = leaderboard.leaderboard_markdown(table).splitlines()
    assert len(lines) == 4
    assert ("| cpe | Van Gogh | 7.5% [5, 12] | 0.0% [0, 9] | 10.0% [6, 15] | +0.0 [+0.0, +0.0] | "
            "color -1.0 [-2.5, +0.0] | 0.01 | 10% [3, 30] | 15% | 65% | 80% | 144 s | 670 MB |") in lines
    older = leaderboard.leaderboard([{c: row[c] for c in shipped.columns[:13]} for _, row in shipped.iterrows()])
    assert older[leaderboard.DETAIL_COLUMNS].isna().all().all()  # a cell from before intervals: empty, not invented
    assert "[" not in leaderboard.leaderboard_markdown(older).splitlines()[2]
    paths = leaderboard.save_leaderboard(table, tmp_path, "test")
    assert [p.name for p in paths] == ["leaderboard.png", "leaderboard-attacks.png", "leaderboard-cost.png"]
    assert all(p.stat().st_size > 10_000 for p in paths) and (tmp_path / "leaderboard.csv").is_file()


def test_the_sweep_runs_the_benchmarks_cells(tmp_path):
    sweep = load("bench/esd_sweep.py")
    assert sweep.split_method({"lr": "1e-3"}, ["--train_method", "noxattn", "--sample_from", "base"]) == \
        ("esd-u", "--lr 1e-3 --sample_from base")
    assert sweep.split_method({"train_method": "esd-x-strict"}, []) == ("esd-x-strict", "")
    assert sweep.split_method({}, [])[0] == "esd-x"
    settings = {"base_sha256": "a" * 64, "num_samples": 10, "ddim_steps": 50, **sweep.BENCHMARK_ATTACKS}
    swept = leaderboard.Cell("esd-x", "star", tmp_path, {**settings, "erase_args": ""})
    benchmarked = leaderboard.Cell("esd-x", "star", tmp_path, {"base_sha256": "a" * 64, "num_samples": 10,
                                                               "ddim_steps": 50, "attack_steps": 40,
                                                               "generations": 100, "ti_steps": 1000, "erase_args": ""})
    assert swept.key == benchmarked.key and swept.folder == benchmarked.folder
    partial = {"method": "esd-x", "concept": "star", "run": swept.run_name, "seconds": 1.0, "peak_mb": 5,
               "efficacy": 0.0, "key": swept.key}
    swept.folder.mkdir(parents=True)
    swept.result_path.write_text(json.dumps(partial))
    assert swept.finished(attacks=True) is None  # the benchmark still has its attacks to run
    assert swept.stored()["seconds"] == 1.0  # the erase is kept


def finish_cell(cell, prompts_path):
    """Write ``cell``'s result as every step had run (attacks included) and a current report beside it."""
    cell.folder.mkdir(parents=True, exist_ok=True)
    cell.report_dir.mkdir(parents=True, exist_ok=True)
    (cell.report_dir / "summary.csv").write_text("key,value\n")
    (cell.report_dir / "models.json").write_text(json.dumps(
        {"prompts": {"path": str(prompts_path), "sha256": file_sha256(prompts_path)}}))
    cell.result_path.write_text(json.dumps({"method": cell.method, "concept": cell.concept, "run": cell.run_name,
                                            "seconds": 1.0, "peak_mb": 5, "efficacy": 0.0,
                                            **{f"{p}asr_{w}": 0.0 for _, p, _ in leaderboard.ATTACK_STEPS
                                               for w in ("pre", "post")}, "key": cell.key}))


def test_the_leaderboard_holds_every_finished_cell_of_its_settings(tmp_path):
    """A subset invocation's leaderboard keeps the other finished cells of the same settings, never those of
    other settings (the images per prompt here) or older defaults (a cell whose key is not today's)."""
    settings = {"base_sha256": "a" * 64, "num_samples": 10, "ddim_steps": 50, "attack_steps": 40,
                "generations": 100, "ti_steps": 1000, "erase_args": ""}
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("case_number,prompt\n0,a star\n")
    kept = [leaderboard.Cell("esd-x", "star", tmp_path, settings), leaderboard.Cell("sepce", "moon", tmp_path, settings)]
    other = leaderboard.Cell("esd-x", "moon", tmp_path, {**settings, "num_samples": 2})
    for cell in [*kept, other]:
        finish_cell(cell, prompts)
    older = tmp_path / "cells" / "cpe-star-0000000000"  # a cell of defaults since changed: its key is stale
    shutil.copytree(kept[0].folder, older)
    found = leaderboard.finished_cells(tmp_path, settings)
    assert sorted((r["method"], r["concept"]) for r in found) == [("esd-x", "star"), ("sepce", "moon")]
    prompts.write_text("case_number,prompt\n0,a red star\n")  # a changed prompt set: its reports are stale
    assert leaderboard.finished_cells(tmp_path, settings) == []


def test_a_cells_key_follows_the_settings_its_erase_resolves(tmp_path, monkeypatch):
    """A changed default (model config or paper) makes a new cell: the key holds the erase's resolved settings."""
    config = load_config(TINY_SD_DIR / "config.yaml")
    config["esd-u_defaults"]["lr"] = 1.0e-4
    other = tmp_path / "config.yaml"
    OmegaConf.save(config, other)
    assert run_settings("esd-u", ["--prompt", "moon"])["lr"] == 3e-4  # tiny-sd's esd-u_defaults
    assert run_settings("esd-u", ["--prompt", "moon", "--config_path", other])["lr"] == 1e-4
    settings = {"base_sha256": "a" * 64, "num_samples": 10, "ddim_steps": 50, "attack_steps": 40,
                "generations": 100, "erase_args": ""}
    before = leaderboard.Cell("esd-u", "moon", tmp_path, settings)
    monkeypatch.setattr(leaderboard, "run_settings", lambda method, flags: {**run_settings(method, flags), "lr": 1e-4})
    assert leaderboard.Cell("esd-u", "moon", tmp_path, settings).key != before.key


def test_a_rerun_becomes_the_table_only_with_its_identity(tmp_path, monkeypatch):
    copy = tmp_path / "results"
    shutil.copytree(results.RESULTS_DIR, copy)
    monkeypatch.setattr(results, "RESULTS_DIR", copy)
    manifest = json.loads((copy / "esd-u-lower-lr.json").read_text())
    source = outputs_dir() / f"{tmp_path.name}.csv"  # "outputs/..." in a manifest is under LDM_OUTPUTS_DIR
    source.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.read_csv(copy / "esd-u-lower-lr.csv").assign(base_sha256=results.shipped_identity())
    frame.to_csv(source, index=False)
    (copy / "esd-u-lower-lr.json").write_text(json.dumps({**manifest, "source": [f"outputs/{source.name}"]}))
    assert results.staleness("esd-u-lower-lr") is not None
    results.collect("esd-u-lower-lr", "2030-01-01")
    assert results.staleness("esd-u-lower-lr") is None
    assert results.load_manifest("esd-u-lower-lr")["date"] == "2030-01-01"
    frame.assign(base_sha256=["b" * 12, "c" * 12] * (len(frame) // 2)).to_csv(source, index=False)
    with pytest.raises(UsageError, match="several base models"):
        results.collect("esd-u-lower-lr", "2030-01-02")
    with pytest.raises(UsageError, match="transcribed by hand"):
        results.collect("cpe-anchors", "2030-01-02")


def test_a_cell_runs_its_steps_once_each_and_resumes(tmp_path, monkeypatch):
    """The cell's orchestration with the scripts stood in for: erase, report, attacks, each step's figures kept as it
    ends; a sweep's cell (no attacks) later finished by the benchmark runs only the attacks."""
    from ldm.paths import models_dir
    prompts = concept_prompts("heart").fillna("")
    summary = erasure_summary("heart", predictions(prompts, 1, found=lambda r, s: True), predictions(prompts, 1),
                              prompts, bootstrap=20)
    prompt_file = tmp_path / "heart.csv"
    prompts.to_csv(prompt_file, index=False)
    calls = []

    def fake(args, log):
        script, flags = str(args[0]), dict(zip(map(str, args[1::2]), map(str, args[2::2])))
        calls.append(script.split("/")[-1])
        if script.endswith("erase.py"):
            (models_dir() / flags["--run_name"]).mkdir(parents=True, exist_ok=True)
        elif script.endswith("erasure-report.py"):
            folder = tmp_path / flags["--save_path"] / "reports" / flags["--model_name"]
            folder.mkdir(parents=True, exist_ok=True)
            summary.to_csv(folder / "summary.csv", index=False)
            pd.DataFrame({"set": ["without"], "prompts": [48], "feature_distance": [0.5]}).to_csv(folder / "drift.csv")
            (folder / "models.json").write_text(json.dumps({"prompts": {"path": str(prompt_file),
                                                                        "sha256": file_sha256(prompt_file)}}))
        else:
            row = {"attack": flags["--attack"], "images": 20, "key": flags["--attack"]}
            row.update({f"asr_{w}{end}": v for w in ("pre", "post")
                        for end, v in (("", .1), ("_low", .03), ("_high", .3))})
            folder = tmp_path / flags["--save_path"]
            old = pd.read_csv(folder / "summary.csv") if (folder / "summary.csv").is_file() else pd.DataFrame()
            folder.mkdir(parents=True, exist_ok=True)
            pd.concat([old, pd.DataFrame([row])]).to_csv(folder / "summary.csv", index=False)
        return 2.0, 300.0

    monkeypatch.setattr(leaderboard, "run_child", fake)
    settings = {"base_sha256": "f" * 64, "num_samples": 1, "ddim_steps": 2, "attack_steps": 1, "generations": 1,
                "ti_steps": 1, "erase_args": ""}
    cell = leaderboard.Cell("esd-x", "heart", tmp_path / "bench", settings)
    swept = cell.run(attacks=False)
    assert calls == ["erase.py", "erasure-report.py"] and "asr_post" not in swept
    assert swept["efficacy"] == summary.set_index("key").edited["found_combined"] and swept["seconds"] == 2.0
    result = leaderboard.Cell("esd-x", "heart", tmp_path / "bench", settings).run()
    assert calls[2:] == ["attack.py"] * 3 and result["ringabell_asr_post_high"] == .3 and result["ti_asr_post"] == .1
    assert leaderboard.leaderboard([result]).efficacy_images.iloc[0] == 20  # 20 prompts naming it, 1 image each
    assert cell.finished() == result
    prompt_file.write_text(prompt_file.read_text() + "\n")  # the prompt set changed: report and attacks again
    assert cell.finished() is None and "seconds" in cell.stored() and "efficacy" not in cell.stored()
    cell.run()
    assert calls[5:] == ["erasure-report.py", "attack.py", "attack.py", "attack.py"]


def test_report_table_reads_a_reports_figures_by_key_and_refuses_bad_input(tmp_path):
    """bench/report_table.py: one row per run from its report (read by key), cost from --cost; a run without a
    report or a malformed --cost is one line."""
    from conftest import call_script, one_line_error
    prompts = concept_prompts("heart").fillna("")
    summary = erasure_summary("heart", predictions(prompts, 2, found=lambda row, sample: True),
                              predictions(prompts, 2, found=lambda row, sample: row.set == "alone" and sample == 0),
                              prompts, bootstrap=50)
    folder = tmp_path / "reports" / "run-heart"
    folder.mkdir(parents=True)
    summary.assign(measure=summary.measure.where(summary.key != "found_combined", "'heart' found, combined")
                   ).to_csv(folder / "summary.csv", index=False)
    pd.DataFrame({"set": ["without"], "prompts": [48], "feature_distance": [1.5]}).to_csv(folder / "drift.csv", index=False)
    out = tmp_path / "table.csv"
    done = call_script("bench/report_table.py", "run-heart", "--out", out, "--reports", tmp_path / "reports",
                       "--cost", "run-heart=31,702")
    assert done.returncode == 0, done.stderr
    row = pd.read_csv(out, dtype=str).iloc[0]
    assert (row.concept, row.attribute, row.found_combined, row.found_alone, row.drift) == ("heart", "object", "10.0",
                                                                                         "50.0", "1.50")
    assert (row.same_attribute, row.erase_seconds, row.peak_mb) == ("+0.0", "31", "702")
    line = one_line_error(call_script("bench/report_table.py", "run-heart", "--out", out, "--cost", "run-heart=31"))
    assert "is not RUN=SECONDS,MB" in line
    line = one_line_error(call_script("bench/report_table.py", "no-such-run", "--out", out, "--reports", tmp_path))
    assert "no erasure report for 'no-such-run'" in line
