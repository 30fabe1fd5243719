"""Sweep ESD settings on tiny-sd: erase each concept with each setting, report, and tabulate.

    python bench/esd_sweep.py --concepts 'circle,Van Gogh' \
        --grid 'lr=1e-4,5e-4' --grid 'negative_guidance=1,2' --grid 'iterations=200,400'
    python bench/esd_sweep.py --concepts heart --design one_at_a_time --grid 'lr=3e-4,1e-4,1e-3' ...

Every combination of the --grid values (flags of train-scripts/train-esd.py, with --fixed flags added to all;
with --design one_at_a_time, the first value of every flag, then each other value changed alone) is one cell
of the benchmark (ldm.leaderboard.Cell, under --save_path/cells/): the erase (train-scripts/erase.py with the
method --train_method names, default esd-x, and the other flags) and its erasure report, run as the user runs
them, without the benchmark's attacks. A cell is keyed by the method, the concept, the base model's identity
(whose esd_defaults set every flag not given) and every setting, so a killed sweep resumes where it stopped,
a changed prompt set remakes only the report, and a sweep's cell with the benchmark's settings is the
benchmark's own. Writes --out (default outputs/esd-sweep.csv): one row per run and report row (read by the
report's keys), with the run's flags, the erase's wall-clock seconds and every figure with its interval and
verdict; rows of other runs already in the file are kept, so several sweeps can share it. ``--table CSV
[CSV ...]`` prints such files as the docs' Markdown table (one line per run) and runs nothing.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ldm beside this script, in whichever clone

import itertools
import shlex

import pandas as pd

from ldm.attacks.textual_inversion import TextualInversionSettings
from ldm.cli import DEFAULT_CKPT, DEFAULT_CONFIG, new_parser, run
from ldm.erasure import methods
from ldm.identity import compvis_identity
from ldm.leaderboard import Cell
from ldm.paths import outputs_dir
from ldm.results import sweep_markdown as markdown_table
from ldm.util import UsageError, atomic_to_csv

# the benchmark's attack settings: a sweep cell with the benchmark's erase flags is the benchmark's cell
BENCHMARK_ATTACKS = {"attack_steps": 40, "generations": 100, "ti_steps": TextualInversionSettings.steps}


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


def merge_rows(kept, new):
    """The rows of ``kept`` (an earlier sweep file) whose runs are not in ``new``, then ``new``."""
    if kept.empty:
        return new
    merged = pd.concat([kept[~kept["run"].isin(new["run"])], new], ignore_index=True)
    flags = [c for frame in (kept, new) for c in frame.columns[:list(frame.columns).index("group")]]
    flags = list(dict.fromkeys(flags))  # both sweeps' flag columns, before the report's columns
    return merged[flags + [c for c in merged.columns if c not in flags]]


def split_method(flags, fixed):
    """The method a sweep row erases with (``--train_method`` of its grid flags or of ``--fixed``, default esd-x)
    and the erase's other flags, as one string."""
    fixed = list(fixed)
    train_method = flags.get("train_method")
    if "--train_method" in fixed:
        i = fixed.index("--train_method")
        train_method = train_method or fixed[i + 1]
        del fixed[i:i + 2]
    others = [x for k, v in flags.items() if k != "train_method" for x in (f"--{k}", v)]
    return methods.esd_variant(train_method or "xattn").name, shlex.join(others + fixed)


def sweep_rows(cell, concept, flags, fixed_text):
    """The cell's report as sweep rows: its run, concept and flags, then the report's columns and the erase's
    seconds."""
    summary = pd.read_csv(cell.report_dir / "summary.csv")
    for position, (key, value) in enumerate({"run": cell.run_name, "concept": concept, **flags,
                                             "fixed": fixed_text}.items()):
        summary.insert(position, key, value)
    summary["erase_seconds"] = cell.stored()["seconds"]
    return summary


def main(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("--concepts", help="comma-separated tiny-sd concepts")
    parser.add_argument("--table", nargs="+", metavar="CSV", help="print these sweep CSVs as Markdown and stop")
    parser.add_argument("--grid", action="append", default=[], help="NAME=V1,V2,... (a train-esd.py flag)")
    parser.add_argument("--design", default="full", choices=["full", "one_at_a_time"],
                        help="every combination, or the first values plus one flag changed at a time")
    parser.add_argument("--fixed", default="", help="flags for every run, e.g. \"--train_method xattn\"")
    parser.add_argument("--num_samples", type=int, default=10, help="report: images per prompt")
    parser.add_argument("--ddim_steps", type=int, default=50, help="report: DDIM steps")
    parser.add_argument("--save_path", default=str(outputs_dir() / "benchmark"),
                        help="the cells' folder (the benchmark's)")
    parser.add_argument("--out", default=str(outputs_dir() / "esd-sweep.csv"))
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
    common = {"base_sha256": compvis_identity(config, ckpt)["sha256"], "num_samples": args.num_samples,
              "ddim_steps": args.ddim_steps, **BENCHMARK_ATTACKS}
    out = Path(args.out)
    kept = pd.read_csv(out) if out.is_file() else pd.DataFrame()  # rows of earlier sweeps into the same file stay
    rows = []
    for concept in [c.strip() for c in args.concepts.split(",") if c.strip()]:
        for flags in settings:
            method, erase_args = split_method(flags, fixed)
            cell = Cell(method, concept, args.save_path, {**common, "erase_args": erase_args})
            cell.run(attacks=False)
            rows.append(sweep_rows(cell, concept, flags, args.fixed))
            atomic_to_csv(merge_rows(kept, pd.concat(rows, ignore_index=True)), out)
            print(f"{cell.run_name}: {concept} {flags} done ({cell.folder})", flush=True)
    print(f"sweep table in {args.out}")


if __name__ == "__main__":
    run(main)
