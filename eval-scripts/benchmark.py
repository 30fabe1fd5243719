"""Rank erasure methods on the same concepts with one command.

    python eval-scripts/benchmark.py                                             # every method, Van Gogh and star
    python eval-scripts/benchmark.py --methods esd-x,sepce --concepts moon

For each method and concept: erase with the method's defaults (train-scripts/, run bench-<method>-<concept>-<key>),
report (eval-scripts/erasure-report.py: efficacy = found on the concept's prompts, combined set;
specificity = change in points of the other values of its attribute and of the other attributes, on
prompts without it; drift = evaluator-feature distance there), attack (eval-scripts/attack.py:
UnlearnDiffAtk, then Ring-A-Bell) and measure the erase's wall time and peak memory (the child process's
largest resident set). Writes --save_path/leaderboard.csv and leaderboard.png, and a folder per cell with
its logs, report and attacks. A finished cell is not redone unless its inputs' hash changed (method,
concept, base model identity, every setting below).
"""
from ldm.cli import new_parser, run
from ldm.leaderboard import METHODS, Cell, check_methods, leaderboard, save_leaderboard
from ldm.loading import load_model


def main():
    parser = new_parser(__doc__)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--concepts", default="Van Gogh,star", help="comma-separated tiny-sd concepts")
    parser.add_argument("--save_path", default="outputs/benchmark")
    parser.add_argument("--num_samples", type=int, default=10, help="report: images per prompt")
    parser.add_argument("--ddim_steps", type=int, default=50, help="report and attacks: DDIM steps")
    parser.add_argument("--attack_steps", type=int, default=40, help="UnlearnDiffAtk's steps")
    parser.add_argument("--generations", type=int, default=100, help="Ring-A-Bell's generations")
    parser.add_argument("--erase_args", default="", help="extra flags for every erase, e.g. '--iterations 2' for "
                                                         "a smoke run (part of each cell's hash)")
    args = parser.parse_args()

    methods = check_methods([m.strip() for m in args.methods.split(",") if m.strip()])
    concepts = [c.strip() for c in args.concepts.split(",") if c.strip()]
    base = load_model("tiny-sd")
    settings = {"base_sha256": base.sha256, "num_samples": args.num_samples, "ddim_steps": args.ddim_steps,
                "attack_steps": args.attack_steps, "generations": args.generations, "erase_args": args.erase_args}
    results = []
    for concept in concepts:
        for method in methods:
            cell = Cell(method, concept, args.save_path, settings)
            result = cell.finished()
            print(f"{method} on '{concept}': {'finished earlier' if result else 'running'} ({cell.folder})", flush=True)
            results.append(result or cell.run())
    table = leaderboard(results)
    png = save_leaderboard(table, args.save_path, f"tiny-sd ({base.sha256[:12]}): {args.num_samples} images per "
                                                   f"prompt, {args.ddim_steps} DDIM steps")
    print(table.to_string(index=False))
    print(f"leaderboard: {args.save_path}/leaderboard.csv, {png}")


if __name__ == "__main__":
    run(main)
