"""The one-command comparison behind ``eval-scripts/benchmark.py``: for each method and concept, erase with
the method's defaults, report, attack, and measure the erase's wall time and peak memory; then one
leaderboard row per cell.

Every step runs the project's own script in a child process (the same commands a user types), so a cell
measures exactly what the README's commands do. On tiny-sd the report is the erasure report (the evaluator's
attributes give specificity and drift); on any other base (SD v1) the user names the judge and the concept's
prompts, efficacy is the judge's rate on the erased model's images of those prompts (the attacks' pre-attack
images), and specificity and drift are left empty: the judge sees only the concept (measure preservation on
SD with eval-scripts/fid.py and clip-score.py on COCO-30k). A cell's result is written atomically with the hash of
its inputs (method, concept, base model identity, every setting); a rerun skips a finished cell unless
that hash changed.
"""
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from ldm.data.prompt_sets import concept_filename
from ldm.erasure import methods
from ldm.paths import REPO_ROOT
from ldm.plots import plt, save_figure
from ldm.util import UsageError, atomic_to_csv, atomic_write_text, json_sha256

COLUMNS = ["method", "concept", "efficacy", "specificity_same", "specificity_other", "drift", "asr_pre", "asr_post",
           "ringabell_asr_pre", "ringabell_asr_post", "seconds", "peak_mb", "run"]


def check_methods(names):
    """The method names, each one of the registry's; an unknown one is a one-line error."""
    unknown = [m for m in names if m not in methods.METHODS]
    if unknown or not names:
        raise UsageError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; use some of "
                         f"{', '.join(methods.METHODS)}")
    return names


def run_child(args, log):
    """Run ``python3 <args>`` from the repository root, output to ``log``; returns (seconds, peak MB of
    that child). A failure is a one-line error naming the command and its log."""
    start = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage (peak memory), unlike wait()
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped: Popen must not wait for it again
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        tail = Path(log).read_text(errors="replace").strip().splitlines()[-1:] or [""]
        raise UsageError(f"'{shlex.join(map(str, args))}' failed ({tail[0][:200]}); see {log}")
    return seconds, usage.ru_maxrss / 1024  # Linux reports KB


def concept_prompts(template, concept):
    """A concept's prompt file: ``template`` with ``{concept}`` replaced by its file stem (``Van Gogh`` ->
    ``van_gogh``), or ``template`` itself."""
    return template.replace("{concept}", concept_filename(concept)[:-len(".csv")])


def report_figures(summary, drift, concept):
    """Efficacy (found, combined), specificity same attribute and other attributes (mean change in points),
    and drift on the ``without`` set, from an erasure report's ``summary.csv`` and ``drift.csv``."""
    rows = summary.set_index("measure")
    same = summary[(summary.group == "same attribute") & summary.measure.str.startswith("other ")]
    other = summary[summary.group == "other attributes"]
    without = drift[drift["set"] == "without"]["feature_distance"]
    return {"efficacy": float(rows.loc[f"'{concept}' found, combined", "edited"]),
            "specificity_same": float(same.change_points.iloc[0]),
            "specificity_other": float(other.change_points.mean()),
            "drift": float(without.iloc[0]) if len(without) else float("nan")}


class Cell:
    """One method on one concept, under ``save_path/cells/<method>-<concept>-<key>``, its run
    ``models/bench-<method>-<concept>-<key>`` (``--overwrite`` replaces only a killed attempt of this very cell)."""

    def __init__(self, method, concept, save_path, settings):
        self.method, self.concept, self.settings = method, concept, settings
        slug = concept.replace(" ", "_")
        self.key = json_sha256({"method": method, "concept": concept, **settings})
        # the key in both names: a cell of other settings never overwrites this one's run or results
        self.folder = Path(save_path) / "cells" / f"{method}-{slug}-{self.key[:10]}"
        self.run_name = f"bench-{method}-{slug}-{self.key[:10]}"
        self.result_path = self.folder / "result.json"

    def finished(self):
        """The stored result when its inputs' hash is this cell's, else None."""
        if self.result_path.is_file():
            result = json.loads(self.result_path.read_text())
            if result.get("key") == self.key:
                return result
        return None

    def run(self):
        """Erase, report, attack (UnlearnDiffAtk, Ring-A-Bell); write and return the cell's result. A base other
        than tiny-sd is the settings' ``sd`` section: {"config_path", "ckpt_path", "judge", "prompts_path",
        "image_size", "prompts_sha256"}."""
        self.folder.mkdir(parents=True, exist_ok=True)
        s = self.settings
        sd = s.get("sd")
        base_flags = ["--config_path", sd["config_path"], "--ckpt_path", sd["ckpt_path"]] if sd else []
        seconds, peak_mb = run_child(["train-scripts/erase.py", "--method", self.method, "--prompt", self.concept,
                                      *base_flags,
                                      "--run_name", self.run_name, "--overwrite", "--no_diffusers",
                                      *shlex.split(s["erase_args"])], self.folder / "erase.log")
        result = {"method": self.method, "concept": self.concept, "run": self.run_name}
        if sd is None:
            report_dir = self.folder / "erasure"
            run_child(["eval-scripts/erasure-report.py", "--model_name", self.run_name, "--save_path", report_dir,
                       "--num_samples", s["num_samples"], "--ddim_steps", s["ddim_steps"]], self.folder / "report.log")
            reports = report_dir / "reports" / self.run_name
            result.update(report_figures(pd.read_csv(reports / "summary.csv"), pd.read_csv(reports / "drift.csv"),
                                         self.concept))
        result.update({"seconds": round(seconds, 1), "peak_mb": round(peak_mb)})
        attacks = self.folder / "attacks"
        judge_flags = ([] if sd is None else
                       ["--judge", sd["judge"], "--prompts_path", concept_prompts(sd["prompts_path"], self.concept),
                        *(["--image_size", sd["image_size"]] if sd.get("image_size") else [])])
        for attack, prefix, extra in (("unlearndiffatk", "", ["--steps", s["attack_steps"]]),
                                      ("ringabell", "ringabell_", ["--generations", s["generations"]])):
            run_child(["eval-scripts/attack.py", "--model_name", self.run_name, "--concept", self.concept, "--attack",
                       attack, "--save_path", attacks, "--ddim_steps", s["ddim_steps"], *judge_flags, *extra],
                      self.folder / f"attack-{attack}.log")
            row = pd.read_csv(attacks / "summary.csv").set_index("attack").loc[attack]
            result.update({f"{prefix}asr_pre": float(row.asr_pre), f"{prefix}asr_post": float(row.asr_post)})
        if sd is not None:  # the judge's rate on the erased model's own images of the concept's prompts
            result.update({"efficacy": result["asr_pre"], "specificity_same": float("nan"),
                           "specificity_other": float("nan"), "drift": float("nan")})
        result["key"] = self.key
        atomic_write_text(self.result_path, json.dumps(result, indent=2))
        return result


def leaderboard(results):
    """The leaderboard table (one row per cell, ``COLUMNS``), best efficacy first within each concept."""
    table = pd.DataFrame(results)[COLUMNS]
    return table.sort_values(["concept", "efficacy", "specificity_same"], ascending=[True, True, False])


def save_leaderboard(table, save_path, title):
    """``leaderboard.csv`` and ``leaderboard.png`` (a table a researcher can paste) under ``save_path``."""
    save_path = Path(save_path)
    atomic_to_csv(table, save_path / "leaderboard.csv")
    shown = table.drop(columns=["run"]).copy()
    for column in ("efficacy", "asr_pre", "asr_post", "ringabell_asr_pre", "ringabell_asr_post"):
        shown[column] = [f"{100 * v:.1f}%" for v in shown[column]]
    for column in ("specificity_same", "specificity_other"):
        shown[column] = ["n/a" if pd.isna(v) else f"{v:+.1f}" for v in shown[column]]
    shown["drift"] = ["n/a" if pd.isna(v) else f"{v:.2f}" for v in shown["drift"]]
    figure, axis = plt.subplots(figsize=(1.3 * len(shown.columns), 0.5 * (len(shown) + 2)))
    axis.axis("off")
    labels = [c.replace("ringabell_asr_", "Ring-A-Bell\nASR ").replace("asr_", "ASR\n").replace("specificity_", "spec.\n")
              .replace("peak_mb", "peak\nMB") for c in shown.columns]
    cells = axis.table(cellText=shown.values, colLabels=labels,
                       loc="center", cellLoc="center")
    cells.auto_set_font_size(False)
    cells.set_fontsize(8)
    cells.scale(1, 2.2)
    axis.set_title(title, fontsize=9)
    png = save_figure(figure, save_path / "leaderboard.png")
    return png
