"""Rows of a results table from erasure reports: one row per run, read from its report's summary.csv and drift.csv.

    python bench/report_table.py cpe-word_moon cpe-word_VanGogh --out docs/results/cpe-defaults.csv \
        --cost cpe-word_moon=31,702 --cost cpe-word_VanGogh=30,701

Columns: the run, its concept and attribute; found alone, with_others and combined (percent, with the 95%
interval); the change in points on the attribute's other values and on each other attribute (with intervals);
drift on the ``without`` set; the iterations the run trained (its training.json); and, where ``--cost RUN=SECONDS,MB`` gives them, the erase's
wall time and peak memory (as ``/usr/bin/time -f '%e %M'`` printed them). Figures are read by the report's stable
keys, never by label, so a table is remade from the same reports byte for byte.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ldm beside this script, in whichever clone

import pandas as pd

from ldm.cli import new_parser, run
from ldm.data.prompt_sets import attribute_of
from ldm.leaderboard import report_row
from ldm.paths import outputs_dir
from ldm.runs import run_folder
from ldm.util import UsageError, atomic_to_csv


def percent(value):
    return f"{100 * float(value):.1f}"


def bound(value):
    return f"{round(100 * float(value))}"


def points(value):
    return "" if pd.isna(value) else f"{float(value):+.1f}"


def run_row(run_name, reports, cost):
    """One table row for ``run_name`` from its report under ``reports``."""
    folder = Path(reports) / run_name
    if not (folder / "summary.csv").is_file():
        raise UsageError(f"no erasure report for '{run_name}' under {reports}; run eval-scripts/erasure-report.py "
                         f"--model_name {run_name} first")
    summary, drift = pd.read_csv(folder / "summary.csv"), pd.read_csv(folder / "drift.csv")
    concept = report_row(summary, "found_combined").measure.split("'")[1]
    row = {"run": run_name, "concept": concept, "attribute": attribute_of(concept)}
    for key in ("found_alone", "found_with_others", "found_combined"):
        found = report_row(summary, key)
        row.update({key: percent(found.edited), f"{key}_low": bound(found.edited_low),
                    f"{key}_high": bound(found.edited_high)})
    same = report_row(summary, "same_attribute")
    row.update(same_attribute=points(same.change_points), same_attribute_low=points(same.change_low),
               same_attribute_high=points(same.change_high))
    others = summary[summary["key"].str.startswith("other_attribute:")]
    for i, other in enumerate(others.itertuples(), start=1):
        row.update({f"other{i}": other.key.split(":")[1] + "s", f"other{i}_change": points(other.change_points),
                    f"other{i}_change_low": points(other.change_low), f"other{i}_change_high": points(other.change_high)})
    row["drift"] = f"{float(drift[drift['set'] == 'without']['feature_distance'].iloc[0]):.2f}"
    training = run_folder(run_name) / "training.json"
    row["iterations"] = json.loads(training.read_text())["iterations"] if training.is_file() else ""
    seconds, megabytes = cost.get(run_name, ("", ""))
    row.update(erase_seconds=seconds, peak_mb=megabytes)
    return row


def parse_cost(values):
    """``RUN=SECONDS,MB`` flags as ``{run: (seconds, MB)}``."""
    cost = {}
    for value in values:
        name, _, figures = value.partition("=")
        parts = figures.split(",")
        if not name or len(parts) != 2:
            raise UsageError(f"--cost '{value}' is not RUN=SECONDS,MB (e.g. cpe-word_moon=31,702)")
        cost[name] = (parts[0].strip(), parts[1].strip())
    return cost


def main(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("runs", nargs="+", help="run names whose reports make the rows")
    parser.add_argument("--out", required=True, help="the CSV to write")
    parser.add_argument("--reports", default=str(outputs_dir() / "erasure" / "reports"),
                        help="where erasure-report.py wrote them")
    parser.add_argument("--cost", action="append", default=[], metavar="RUN=SECONDS,MB")
    args = parser.parse_args(argv)
    cost = parse_cost(args.cost)
    table = pd.DataFrame([run_row(name, args.reports, cost) for name in args.runs])
    atomic_to_csv(table, args.out)
    print(f"wrote {len(table)} rows to {args.out}")


if __name__ == "__main__":
    run(main)
