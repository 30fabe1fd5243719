"""Sweep ESD settings on tiny-sd: erase each concept with each setting, report, and tabulate.

    python bench/esd_sweep.py --concepts 'circle,Van Gogh' \
        --grid 'lr=1e-4,5e-4' --grid 'negative_guidance=1,2' --grid 'iterations=200,400'

Every combination of the --grid values (flags of train-scripts/train-esd.py, with --fixed flags added
to all) is trained with train-esd.py and measured with erasure-report.py, both run as the user runs
them. Runs are named by concept and a digest of their flags, so a killed sweep resumes where it
stopped: a finished run with a report is not redone. Writes --out (default outputs/esd-sweep.csv): one
row per run and report row, with the run's flags, the erase's wall-clock seconds and every report
figure with its interval and verdict.
"""
import hashlib
import itertools
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from ldm.cli import new_parser, run
from ldm.paths import MODELS_DIR, REPO_ROOT
from ldm.util import UsageError, atomic_to_csv


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


def sweep_run_name(concept, flags):
    """A stable run name for a concept and its flags."""
    text = " ".join(f"--{k} {v}" for k, v in sorted(flags.items()))
    digest = hashlib.sha256(f"{concept}|{text}".encode()).hexdigest()[:10]
    return f"sweep-{concept.replace(' ', '')}-{digest}"


def _script(path, *args):
    command = [sys.executable, str(REPO_ROOT / path), *map(str, args)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise UsageError(f"{shlex.join(command)} failed: {result.stderr.strip().splitlines()[-1:]}")
    return result


def main():
    parser = new_parser(__doc__)
    parser.add_argument("--concepts", required=True, help="comma-separated tiny-sd concepts")
    parser.add_argument("--grid", action="append", default=[], help="NAME=V1,V2,... (a train-esd.py flag)")
    parser.add_argument("--fixed", default="", help="flags for every run, e.g. \"--train_method xattn\"")
    parser.add_argument("--report_flags", default="", help="flags for erasure-report.py, e.g. \"--num_samples 10\"")
    parser.add_argument("--out", default=str(REPO_ROOT / "outputs/esd-sweep.csv"))
    args = parser.parse_args()
    rows = []
    for concept in [c.strip() for c in args.concepts.split(",") if c.strip()]:
        for flags in combinations(parse_grid(args.grid)):
            name = sweep_run_name(concept, {**flags, "fixed": args.fixed})
            report_dir = REPO_ROOT / "outputs/erasure/reports" / name
            seconds_file = MODELS_DIR / name / "erase-seconds.txt"
            if not (report_dir / "summary.csv").is_file():
                train = ["--prompt", concept, "--run_name", name, "--overwrite", "--no_diffusers",
                         *[x for k, v in flags.items() for x in (f"--{k}", v)], *shlex.split(args.fixed)]
                start = time.perf_counter()
                _script("train-scripts/train-esd.py", *train)
                seconds_file.write_text(f"{time.perf_counter() - start:.1f}\n")
                _script("eval-scripts/erasure-report.py", "--model_name", name, *shlex.split(args.report_flags))
            summary = pd.read_csv(report_dir / "summary.csv")
            summary.insert(0, "run", name)
            summary.insert(1, "concept", concept)
            for position, (key, value) in enumerate({**flags, "fixed": args.fixed}.items(), start=2):
                summary.insert(position, key, value)
            summary["erase_seconds"] = float(seconds_file.read_text()) if seconds_file.is_file() else float("nan")
            rows.append(summary)
            atomic_to_csv(pd.concat(rows, ignore_index=True), Path(args.out))
            print(f"{name}: {concept} {flags} done", flush=True)
    print(f"sweep table in {args.out}")


if __name__ == "__main__":
    run(main)
