"""Results as data: check or rewrite every generated part of the docs, and rerun a table's measurement.

    python3 bench/results.py --check          # exit 2 naming each block, figure or manifest out of date
    python3 bench/results.py --update         # rewrite tables, settings blocks and figures (runs nothing)
    python3 bench/results.py --stale          # the tables not measured on the shipped model, and why
    python3 bench/results.py --rerun esd-defaults   # run a table's commands, take its CSV, then --update
    python3 bench/results.py --rerun-stale    # the same for every stale table that can be collected

Generated blocks: ``<!-- results: NAME -->`` (rendered from docs/results/NAME.csv and its manifest NAME.json:
command, model identity, date, images) and ``<!-- settings: METHOD -->`` (a method's flags with their SD v1 and
tiny-sd defaults, from the registry), in README.md and every page under docs/. The leaderboard figures
(docs/results/leaderboard*.png) are drawn from docs/results/leaderboard.csv by the benchmark's own functions.
A stale table stays marked stale in its caption until its command is rerun: nothing here re-measures a figure
unless --rerun asks it to, and a table transcribed by hand (the template format) is never rerun here.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ldm beside this script, in whichever clone

import datetime
import shlex
import subprocess

from ldm import results
from ldm.cli import new_parser, run
from ldm.paths import REPO_ROOT
from ldm.util import UsageError, atomic_write_text


def update():
    """Rewrite every stale block and, if needed, the leaderboard figures; returns what was rewritten."""
    rewritten = []
    for page, text in results.stale_pages().items():
        atomic_write_text(page, text)
        rewritten.append(str(page.relative_to(REPO_ROOT)))
    if not results.figures_current():
        rewritten += [str(p.relative_to(REPO_ROOT)) for p in results.draw_figures()]
    return rewritten


def stale_tables():
    """``{name: why}`` for every table whose figures are not the shipped model's."""
    return {name: why for name in results.table_names() if (why := results.staleness(name))}


def rerun(name):
    """Run a table's commands as its manifest writes them, then take its CSV and identity from their output."""
    manifest = results.check_collectable(name)  # before any command runs
    for command in manifest["command"]:
        print(f"[{name}] {command}", flush=True)
        argv = shlex.split(command)
        argv[0] = sys.executable if argv[0] == "python3" else argv[0]
        if subprocess.run(argv, cwd=REPO_ROOT).returncode != 0:
            raise UsageError(f"'{command}' failed; {name} is unchanged")
    results.collect(name, datetime.date.today().isoformat())
    print(f"{name}: re-measured under tiny-sd {results.shipped_identity()}")


def main(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("--check", action="store_true", help="exit 2 when anything generated is out of date (default)")
    parser.add_argument("--update", action="store_true", help="rewrite what is out of date from docs/results/")
    parser.add_argument("--stale", action="store_true", help="list the tables not measured on the shipped model")
    parser.add_argument("--rerun", action="append", default=[], metavar="NAME",
                        help="run this table's commands and take its figures from their output (repeatable)")
    parser.add_argument("--rerun-stale", action="store_true", help="--rerun every stale table that can be collected")
    args = parser.parse_args(argv)
    names = list(args.rerun)
    if args.rerun_stale:
        names += [n for n in stale_tables() if results.collectable(results.load_manifest(n))]
    for name in dict.fromkeys(names):
        rerun(name)
    if args.update or names:
        rewritten = update()
        print(f"rewrote {', '.join(rewritten)}" if rewritten else "nothing to rewrite")
    stale = stale_tables()
    if args.stale:
        for name, why in stale.items():
            print(f"{name}: {why}")
        return
    problems = results.problems()
    if problems:
        raise UsageError("; ".join(problems) + "; run python3 bench/results.py --update")
    print(f"docs current: {len(results.table_names())} tables, {len(stale)} of them stale "
          f"(not measured on the shipped tiny-sd {results.shipped_identity()}; --stale lists them)")


if __name__ == "__main__":
    run(main)
