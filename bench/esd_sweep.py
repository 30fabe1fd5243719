"""Sweep ESD settings on tiny-sd: erase each concept with each setting, report, and tabulate.

    python bench/esd_sweep.py --concepts 'circle,Van Gogh' \
        --grid 'lr=1e-4,5e-4' --grid 'negative_guidance=1,2' --grid 'iterations=200,400'
    python bench/esd_sweep.py --concepts heart --design one_at_a_time --grid 'lr=3e-4,1e-4,1e-3' ...

Every combination of the --grid values (flags of train-scripts/train-esd.py, with --fixed flags added
to all; with --design one_at_a_time, the first value of every flag, then each other value changed
alone) is trained with train-esd.py and measured with erasure-report.py, both run as the user runs
them. Runs are named by concept, a digest of their flags and the base model's identity (the SHA-256 of
its checkpoint and config, whose esd_defaults set every flag not given), so a killed sweep resumes where
it stopped (a finished erase is not redone; its report is made again only when its prompt file changed)
and a retrained base model or changed defaults are never reported from an old sweep's runs. Writes --out
(default outputs/esd-sweep.csv): one row per run and report row, with the run's flags, the erase's
wall-clock seconds and every report figure with its interval and verdict; rows of other runs already in
the file are kept, so several sweeps can share it. ``--table CSV [CSV ...]`` prints such files as the
README's Markdown table (one line per run) and runs nothing.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ldm beside this script, in whichever clone

import hashlib
import itertools
import json
import shlex
import subprocess
import time

import pandas as pd

from ldm.cli import DEFAULT_CKPT, DEFAULT_CONFIG, new_parser, run
from ldm.identity import compvis_identity
from ldm.paths import REPO_ROOT, models_dir
from ldm.util import UsageError, atomic_to_csv, file_sha256


def parse_grid(entries):
    """``['lr=1e-4,5e-4', 'iterations=200']`` -> ``{'lr': ['1e-4', '5e-4'], 'iterations': ['200']}``."""
    grid = {}
    for entry in entries:
        name, _, values = entry.partition("=")
        if not name or not values:
            raise UsageError(f"--grid '{entry}' is not NAME=V1,V2,...")
        grid[name.strip().lstrip("-")] = [v.strip() for v in values.split(",") if v.strip()]
    return grid


def combinations(grid):
    """Every combination of the grid's values, as dicts (one empty dict for an empty grid)."""
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]


def one_at_a_time(grid):
    """The first value of every flag, then each other value of each flag with the rest at their first."""
    base = {name: values[0] for name, values in grid.items()}
    return [base] + [{**base, name: value} for name, values in grid.items() for value in values[1:]]


def sweep_run_name(concept, flags, base_sha256=""):
    """A stable run name for a concept, its flags and the base model's identity (checkpoint and config: the
    config's ``esd_defaults`` set every flag not given)."""
    text = " ".join(f"--{k} {v}" for k, v in sorted(flags.items()))
    digest = hashlib.sha256(f"{concept}|{text}|{base_sha256}".encode()).hexdigest()[:10]
    return f"sweep-{concept.replace(' ', '')}-{digest}"


def merge_rows(kept, new):
    """The rows of ``kept`` (an earlier sweep file) whose runs are not in ``new``, then ``new``."""
    if kept.empty:
        return new
    merged = pd.concat([kept[~kept["run"].isin(new["run"])], new], ignore_index=True)
    flags = [c for frame in (kept, new) for c in frame.columns[:list(frame.columns).index("group")]]
    flags = list(dict.fromkeys(flags))  # both sweeps' flag columns, before the report's columns
    return merged[flags + [c for c in merged.columns if c not in flags]]


def _flag_text(value):
    """A flag's value as given: 'default' where the run's sweep did not set it (merged files), 50 not 50.0."""
    if pd.isna(value):
        return "default"
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def markdown_table(frame):
    """One Markdown line per run of a sweep CSV: its flags, efficacy per set, the mean change of the
    attribute's other values and of each other attribute (points, 95% interval), each with its verdict,
    and the erase's seconds."""
    first = list(frame.columns).index("group")
    flag_columns = [c for c in frame.columns[2:first] if c != "fixed" or frame[c].nunique(dropna=False) > 1]

    def cell(row, figure):
        if figure == "efficacy":
            text = f"{row.edited:.0%} [{row.edited_low:.0%}, {row.edited_high:.0%}]"
        else:
            text = f"{row.change_points:+.1f} [{row.change_low:+.1f}, {row.change_high:+.1f}]"
        return f"{text} {row.verdict}".strip()

    columns = ["found, alone", "found, with_others", "same attribute", "other attributes", "erase s"]
    lines = ["| concept | " + " | ".join(flag_columns + columns) + " |", "|" + " --- |" * (1 + len(flag_columns) + len(columns))]
    for (run, concept), rows in frame.groupby(["run", "concept"], sort=False):
        by_measure = {r.measure: r for r in rows.itertuples(index=False)}
        found = [cell(by_measure[f"'{concept}' found, {s}"], "efficacy") if f"'{concept}' found, {s}" in by_measure
                 else "" for s in ("alone", "with_others")]
        same = [cell(r, "change") for r in rows.itertuples(index=False)
                if r.group == "same attribute" and r.measure.startswith("other ")]
        other = [f"{r.measure.split()[0]} {cell(r, 'change')}" for r in rows.itertuples(index=False)
                 if r.group == "other attributes"]
        flags = [_flag_text(rows.iloc[0][c]) for c in flag_columns]
        lines.append("| " + " | ".join([concept, *flags, *found, "; ".join(same), "; ".join(other),
                                        f"{rows.iloc[0].erase_seconds:.0f}"]) + " |")
    return "\n".join(lines)


def report_is_current(report_dir):
    """Whether ``report_dir`` holds a report whose prompt file is still as it was when the report was made
    (a changed prompt set means the report is made again; the erase is kept)."""
    try:
        prompts = json.loads((report_dir / "models.json").read_text())["prompts"]
        return (report_dir / "summary.csv").is_file() and file_sha256(prompts["path"]) == prompts["sha256"]
    except (OSError, KeyError, ValueError):
        return False


def _script(path, *args):
    command = [sys.executable, str(REPO_ROOT / path), *map(str, args)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise UsageError(f"{shlex.join(command)} failed: {result.stderr.strip().splitlines()[-1:]}")
    return result


def main(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("--concepts", help="comma-separated tiny-sd concepts")
    parser.add_argument("--table", nargs="+", metavar="CSV", help="print these sweep CSVs as Markdown and stop")
    parser.add_argument("--grid", action="append", default=[], help="NAME=V1,V2,... (a train-esd.py flag)")
    parser.add_argument("--design", default="full", choices=["full", "one_at_a_time"],
                        help="every combination, or the first values plus one flag changed at a time")
    parser.add_argument("--fixed", default="", help="flags for every run, e.g. \"--train_method xattn\"")
    parser.add_argument("--report_flags", default="", help="flags for erasure-report.py, e.g. \"--num_samples 10\"")
    parser.add_argument("--out", default=str(REPO_ROOT / "outputs/esd-sweep.csv"))
    args = parser.parse_args(argv)
    if args.table:
        for path in args.table:
            if not Path(path).is_file():
                raise UsageError(f"sweep table '{path}' does not exist; run the sweep first")
            print(markdown_table(pd.read_csv(path)))
        return
    if not args.concepts:
        raise UsageError("--concepts is required, e.g. --concepts 'heart,Hokusai' (or --table CSV to print a sweep)")
    grid = parse_grid(args.grid)
    settings = combinations(grid) if args.design == "full" else one_at_a_time(grid)
    fixed = shlex.split(args.fixed)
    ckpt = fixed[fixed.index("--ckpt_path") + 1] if "--ckpt_path" in fixed else DEFAULT_CKPT
    config = fixed[fixed.index("--config_path") + 1] if "--config_path" in fixed else DEFAULT_CONFIG
    base_sha256 = compvis_identity(config, ckpt)["sha256"]
    out = Path(args.out)
    kept = pd.read_csv(out) if out.is_file() else pd.DataFrame()  # rows of earlier sweeps into the same file stay
    rows = []
    for concept in [c.strip() for c in args.concepts.split(",") if c.strip()]:
        for flags in settings:
            name = sweep_run_name(concept, {**flags, "fixed": args.fixed}, base_sha256)
            report_dir = REPO_ROOT / "outputs/erasure/reports" / name
            seconds_file = models_dir() / name / "erase-seconds.txt"
            if not seconds_file.is_file():  # written once the erase has finished
                train = ["--prompt", concept, "--run_name", name, "--overwrite", "--no_diffusers",
                         *[x for k, v in flags.items() for x in (f"--{k}", v)], *fixed]
                start = time.perf_counter()
                _script("train-scripts/train-esd.py", *train)
                seconds_file.write_text(f"{time.perf_counter() - start:.1f}\n")
            if not report_is_current(report_dir):
                _script("eval-scripts/erasure-report.py", "--model_name", name, *shlex.split(args.report_flags))
            summary = pd.read_csv(report_dir / "summary.csv")
            summary.insert(0, "run", name)
            summary.insert(1, "concept", concept)
            for position, (key, value) in enumerate({**flags, "fixed": args.fixed}.items(), start=2):
                summary.insert(position, key, value)
            summary["erase_seconds"] = float(seconds_file.read_text()) if seconds_file.is_file() else float("nan")
            rows.append(summary)
            atomic_to_csv(merge_rows(kept, pd.concat(rows, ignore_index=True)), out)
            print(f"{name}: {concept} {flags} done", flush=True)
    print(f"sweep table in {args.out}")


if __name__ == "__main__":
    run(main)
