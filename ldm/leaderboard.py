"""The one-command comparison behind ``eval-scripts/benchmark.py``: for each method and concept, erase with
the method's defaults, report, attack, and measure the erase's wall time and peak memory; then one
leaderboard row per cell.

Every step runs the project's own script in a child process (the same commands a user types), so a cell
measures exactly what the documented commands do. On tiny-sd the report is the erasure report (the evaluator's
attributes give specificity and drift); on any other base (SD v1) the user names the judge and the concept's
prompts, efficacy is the judge's rate on the erased model's images of those prompts (the attacks' pre-attack
images), and specificity and drift are left empty: the judge sees only the concept (measure preservation on
SD with eval-scripts/fid.py and clip-score.py on COCO-30k). A cell's result is written atomically with the hash of
its inputs (method, concept, base model identity, every setting); a rerun skips a finished cell unless
that hash changed. The leaderboard is ``leaderboard.csv`` and three figures drawn from it (efficacy against
specificity, attacks, cost; ``ldm.leaderboard_figures``), the same functions that draw the docs' figures.
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
from ldm.erasure.erase import run_settings
from ldm.leaderboard_figures import save_figures
from ldm.paths import REPO_ROOT, models_dir
from ldm.util import UsageError, atomic_to_csv, atomic_write_text, file_sha256, json_sha256

# the benchmark's attacks, in order: (attack.py --attack, column prefix, (its flag, the benchmark setting it takes))
ATTACK_STEPS = (("unlearndiffatk", "", ("--steps", "attack_steps")),
                ("ringabell", "ringabell_", ("--generations", "generations")),
                ("textual-inversion", "ti_", ("--ti_steps", "ti_steps")))
FOUND_SETS = ("alone", "with_others")  # the report's prompt sets naming the concept; "combined" is efficacy
COLUMNS = ["method", "concept", "efficacy", "found_alone", "found_with_others", "specificity_same",
           "specificity_other", "specificity_other_worst", "drift", "asr_pre", "asr_post", "ringabell_asr_pre",
           "ringabell_asr_post", "ti_asr_pre", "ti_asr_post", "seconds", "peak_mb", "run"]
# after COLUMNS in leaderboard.csv: the 95% intervals the cell's report and attacks give, and their image counts
DETAIL_COLUMNS = ["efficacy_low", "efficacy_high", *[f"found_{n}_{end}" for n in FOUND_SETS for end in ("low", "high")],
                  "specificity_same_low", "specificity_same_high", "specificity_other_worst_low",
                  "specificity_other_worst_high", "specificity_other_worst_attribute",
                  *[f"{p}asr_{w}_{end}" for p in ("", "ringabell_", "ti_") for w in ("pre", "post")
                    for end in ("low", "high")],
                  "efficacy_images", *[f"found_{n}_images" for n in FOUND_SETS], "specificity_images",
                  "attack_images"]


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


def report_row(summary, key):
    """The row of an erasure report's ``summary.csv`` with stable ``key`` (``found_combined``, ``same_attribute``,
    ...: ``ldm.erasure.report.erasure_summary``); a report without that row is a one-line error."""
    if "key" not in summary:
        raise UsageError("this erasure report has no key column (it predates it); make it again with "
                         "eval-scripts/erasure-report.py")
    rows = summary[summary["key"] == key]
    if rows.empty:
        raise UsageError(f"the erasure report has no '{key}' row (keys: {', '.join(summary['key'])})")
    return rows.iloc[0]


def report_figures(summary, drift):
    """Efficacy (found, combined), specificity on the attribute's other values and on the other attributes
    (mean change in points), each with its interval and image count, and drift on the ``without`` set, from
    an erasure report's ``summary.csv`` (read by key, never by label) and ``drift.csv``."""
    found, same = report_row(summary, "found_combined"), report_row(summary, "same_attribute")
    by_set = {}
    for name in FOUND_SETS:  # the concept named alone, and together with other concepts
        row = report_row(summary, f"found_{name}")
        by_set.update({f"found_{name}": float(row.edited), f"found_{name}_low": float(row.edited_low),
                       f"found_{name}_high": float(row.edited_high), f"found_{name}_images": int(row.images)})
    other = summary[summary["key"].str.startswith("other_attribute:")]
    worst = other.loc[other.change_points.idxmin()]  # the other attribute that lost most, with its interval
    without = drift[drift["set"] == "without"]["feature_distance"]
    return {"efficacy": float(found.edited), "efficacy_low": float(found.edited_low),
            "efficacy_high": float(found.edited_high), "efficacy_images": int(found.images),
            "specificity_same": float(same.change_points), "specificity_same_low": float(same.change_low),
            "specificity_same_high": float(same.change_high), "specificity_images": int(same.images),
            "specificity_other": float(other.change_points.mean()),
            "specificity_other_worst": float(worst.change_points), "specificity_other_worst_low": float(worst.change_low),
            "specificity_other_worst_high": float(worst.change_high),
            "specificity_other_worst_attribute": worst.key.split(":", 1)[1],
            "drift": float(without.iloc[0]) if len(without) else float("nan"), **by_set}


def attack_figures(summary, attack, prefix):
    """ASR before and after ``attack`` with their Wilson intervals and image count, from the newest row of
    that attack in ``attack.py``'s ``summary.csv``, as leaderboard columns (``prefix`` + ``asr_pre`` ...)."""
    row = summary[summary["attack"] == attack].iloc[-1]
    figures = {f"{prefix}{name}{end}": float(row[f"{name}{end}"])
               for name in ("asr_pre", "asr_post") for end in ("", "_low", "_high")}
    figures["attack_images"] = int(row.images)
    return figures


def report_is_current(report_dir):
    """Whether ``report_dir`` holds a report whose prompt file is still as it was when the report was made
    (a changed prompt set means the report is made again; the erase is kept)."""
    try:
        prompts = json.loads((Path(report_dir) / "models.json").read_text())["prompts"]
        return (Path(report_dir) / "summary.csv").is_file() and file_sha256(prompts["path"]) == prompts["sha256"]
    except (OSError, KeyError, ValueError):
        return False


class Cell:
    """One method on one concept, under ``save_path/cells/<method>-<concept>-<key>``, its run
    ``models/bench-<method>-<concept>-<key>`` (``--overwrite`` replaces only a killed attempt of this very cell).

    The benchmark and the ESD sweep (``bench/esd_sweep.py``) run the same cells: erase, report, then (the
    benchmark) attack. Each step's figures are written to ``result.json`` as it ends, so a killed cell resumes
    at its first unfinished step, and a sweep's cell with the benchmark's settings is the benchmark's."""

    def __init__(self, method, concept, save_path, settings):
        self.method, self.concept, self.settings = method, concept, settings
        slug = concept.replace(" ", "_")
        # the method's resolved settings join the key: a changed default (model config or paper) reruns the cell
        self.key = json_sha256({"method": method, "concept": concept, **settings,
                                "method_settings": run_settings(method, self._erase_flags())})
        # the key in both names: a cell of other settings never overwrites this one's run or results
        self.folder = Path(save_path) / "cells" / f"{method}-{slug}-{self.key[:10]}"
        self.run_name = f"bench-{method}-{slug}-{self.key[:10]}"
        self.result_path = self.folder / "result.json"
        # every cell reports under one folder: the base model's images are drawn once, not once per cell
        self.report_root = Path(save_path) / "erasure"
        self.report_dir = self.report_root / "reports" / self.run_name

    def _erase_flags(self):
        """The erase's flags but its run name: the concept, the base (another than tiny-sd) and ``erase_args``."""
        sd = self.settings.get("sd")
        base_flags = ["--config_path", sd["config_path"], "--ckpt_path", sd["ckpt_path"]] if sd else []
        return ["--prompt", self.concept, *base_flags, *shlex.split(self.settings["erase_args"])]

    def stored(self):
        """What the cell has measured so far under its key (possibly not every step), else {}; a report whose
        prompt file has changed since is dropped, with the attacks made on those prompts."""
        if not self.result_path.is_file():
            return {}
        result = json.loads(self.result_path.read_text())
        if result.get("key") != self.key:
            return {}
        if "sd" not in self.settings and "efficacy" in result and not report_is_current(self.report_dir):
            result = {k: v for k, v in result.items() if k in ("method", "concept", "run", "seconds", "peak_mb", "key")}
        return result

    def finished(self, attacks=True):
        """The stored result when every step (the attacks only if ``attacks``) is done under this cell's key."""
        result = self.stored()
        done = "efficacy" in result and (not attacks or all(f"{p}asr_post" in result for _, p, _ in ATTACK_STEPS))
        return result if done else None

    def _save(self, result):
        result["key"] = self.key
        atomic_write_text(self.result_path, json.dumps(result, indent=2))
        return result

    def run(self, attacks=True):
        """Erase, report, attack (UnlearnDiffAtk, Ring-A-Bell; only if ``attacks``), each step unless done; write and
        return the cell's result. A base other than tiny-sd is the settings' ``sd`` section: {"config_path",
        "ckpt_path", "judge", "prompts_path", "image_size", "prompts_sha256"}."""
        self.folder.mkdir(parents=True, exist_ok=True)
        s = self.settings
        sd = s.get("sd")
        result = self.stored()
        if "seconds" not in result or not (models_dir() / self.run_name).is_dir():
            seconds, peak_mb = run_child(["train-scripts/erase.py", "--method", self.method, *self._erase_flags(),
                                          "--run_name", self.run_name, "--overwrite", "--no_diffusers"],
                                         self.folder / "erase.log")
            result = self._save({"method": self.method, "concept": self.concept, "run": self.run_name,
                                 "seconds": round(seconds, 1), "peak_mb": round(peak_mb)})
        if sd is None and "efficacy" not in result:
            run_child(["eval-scripts/erasure-report.py", "--model_name", self.run_name, "--save_path",
                       self.report_root, "--num_samples", s["num_samples"], "--ddim_steps", s["ddim_steps"]],
                      self.folder / "report.log")
            result = self._save({**result, **report_figures(pd.read_csv(self.report_dir / "summary.csv"),
                                                           pd.read_csv(self.report_dir / "drift.csv"))})
        if attacks:
            for attack, prefix, flag in ATTACK_STEPS:
                if f"{prefix}asr_post" not in result:
                    result = self._save({**result, **self._attack(attack, prefix, flag)})
        return result

    def _attack(self, attack, prefix, flag):
        """One attack's figures (each attack is its own step: a killed cell resumes at the first unfinished one); on
        a base other than tiny-sd, efficacy is the judge's rate on the erased model's own images of the concept's
        prompts (the pre-attack images), and specificity and drift are empty."""
        s, sd = self.settings, self.settings.get("sd")
        attacks = self.folder / "attacks"
        judge_flags = ([] if sd is None else
                       ["--judge", sd["judge"], "--prompts_path", concept_prompts(sd["prompts_path"], self.concept),
                        *(["--image_size", sd["image_size"]] if sd.get("image_size") else [])])
        extra = [flag[0], s[flag[1]]]
        if sd is not None and prefix == "ti_":
            extra += ["--ti_images", concept_prompts(sd["ti_images"], self.concept)]
        run_child(["eval-scripts/attack.py", "--model_name", self.run_name, "--concept", self.concept, "--attack",
                   attack, "--save_path", attacks, "--ddim_steps", s["ddim_steps"], *judge_flags, *extra],
                  self.folder / f"attack-{attack}.log")
        figures = attack_figures(pd.read_csv(attacks / "summary.csv"), attack, prefix)
        if sd is not None and prefix == "":
            figures.update({"efficacy": figures["asr_pre"], "efficacy_low": figures["asr_pre_low"],
                            "efficacy_high": figures["asr_pre_high"], "efficacy_images": figures["attack_images"],
                            "specificity_same": float("nan"), "specificity_other": float("nan"),
                            "drift": float("nan")})
        return figures


def finished_cells(save_path, settings, attacks=True):
    """The results of every finished cell under ``save_path`` whose key is what its method and concept give
    under ``settings`` and today's defaults: the cells of earlier invocations with other methods or concepts join
    a leaderboard, while a cell of other settings or older defaults never does."""
    results = []
    for path in sorted(Path(save_path).glob("cells/*/result.json")):
        stored = json.loads(path.read_text())
        if stored.get("method") not in methods.METHODS or "concept" not in stored:
            continue
        cell = Cell(stored["method"], stored["concept"], save_path, settings)
        result = cell.finished(attacks) if cell.folder == path.parent else None
        if result is not None:
            results.append(result)
    return results


def leaderboard(results):
    """The leaderboard table (one row per cell: ``COLUMNS``, then ``DETAIL_COLUMNS``, empty where a cell did not
    record them), best efficacy first within each concept."""
    table = pd.DataFrame(results).reindex(columns=COLUMNS + DETAIL_COLUMNS)
    return table.sort_values(["concept", "efficacy", "specificity_same"], ascending=[True, True, False], kind="stable")


def _interval(low, high, scale, spec):
    return "" if pd.isna(low) or pd.isna(high) else f" [{scale * low:{spec}}, {scale * high:{spec}}]"


def leaderboard_markdown(table):
    """The leaderboard as a Markdown table: each figure with its 95% interval where the cell recorded one."""
    def percent(row, name, digits):
        value = row.get(name, float("nan"))  # a table from before a column: n/a
        if pd.isna(value):
            return "n/a"
        return f"{100 * value:.{digits}f}%" + _interval(row.get(f"{name}_low"), row.get(f"{name}_high"), 100, ".0f")

    def points(row, name):
        value = row.get(name, float("nan"))  # a table from before a column: n/a
        if pd.isna(value):
            return "n/a"
        return f"{value:+.1f}" + _interval(row.get(f"{name}_low"), row.get(f"{name}_high"), 1, "+.1f")

    lines = ["| method | concept | found, combined | alone | with others | same attribute | worst other attribute "
             "| drift | ASR before attack | ASR after UnlearnDiffAtk | ASR after Ring-A-Bell | ASR after textual "
             "inversion | erase | peak memory |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for _, row in table.iterrows():
        worst = points(row, "specificity_other_worst")
        if not pd.isna(row.get("specificity_other_worst_attribute")):
            worst = f"{row.specificity_other_worst_attribute} {worst}"
        elif worst == "n/a" and not pd.isna(row.get("specificity_other")):  # a cell from before: the mean it kept
            worst = f"mean {row.specificity_other:+.1f}"
        cells = [row.method, row.concept, percent(row, "efficacy", 1), percent(row, "found_alone", 1),
                 percent(row, "found_with_others", 1), points(row, "specificity_same"), worst,
                 "n/a" if pd.isna(row.drift) else f"{row.drift:.2f}",
                 percent(row, "asr_pre", 0), percent(row, "asr_post", 0), percent(row, "ringabell_asr_post", 0),
                 percent(row, "ti_asr_post", 0), f"{row.seconds:.0f} s", f"{row.peak_mb:.0f} MB"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_leaderboard(table, save_path, title):
    """``leaderboard.csv`` and the three figures beside it under ``save_path``; returns the figures' paths."""
    atomic_to_csv(table, Path(save_path) / "leaderboard.csv")
    return save_figures(table, save_path, title)
