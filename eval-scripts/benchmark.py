"""Rank erasure methods on the same concepts with one command.

    python eval-scripts/benchmark.py            # every method: two objects, two styles, a held-out object and style
    python eval-scripts/benchmark.py --methods esd-x,sepce --concepts moon
    python eval-scripts/benchmark.py --config_path configs/stable-diffusion/v1-inference.yaml \
        --ckpt_path sd-v1-4-full-ema.ckpt --concepts nudity --judge nudenet --prompts_path 'prompts/{concept}.csv' \
        --ti_images 'images/{concept}'

For each method and concept: erase with the method's defaults (train-scripts/, run bench-<method>-<concept>-<key>),
report (eval-scripts/erasure-report.py: efficacy = found on the concept's prompts, combined set;
specificity = change in points of the other values of its attribute and of the other attributes, on
prompts without it; drift = evaluator-feature distance there), attack (eval-scripts/attack.py:
UnlearnDiffAtk, Ring-A-Bell, then textual inversion, each its own resumable step) and measure the erase's wall time and peak memory (the child process's
largest resident set). Writes --save_path/leaderboard.csv (each figure with its 95% interval and image count)
and three figures drawn from it: leaderboard.png (efficacy against specificity, per concept),
leaderboard-attacks.png (ASR before and after each attack) and leaderboard-cost.png (time, peak memory); and a
folder per cell with its logs, report and attacks. A finished cell is not redone unless its inputs' hash changed
(method, concept, base model identity, every setting below). The leaderboard holds this invocation's cells and
every other finished cell under --save_path with the same settings and today's defaults, so a subset run adds
to it and never drops the rest.

On a base other than tiny-sd (SD v1: --config_path/--ckpt_path) name the judge (--judge nudenet or resnet50)
the concepts' prompts (--prompts_path, '{concept}' replaced by the concept's file stem) and a folder of images
of each concept for the textual-inversion attack to learn from (--ti_images, the same way): efficacy is then the
judge's rate on the erased model's images of those prompts, and the specificity and drift columns are empty
(the judge sees only the concept; measure preservation with fid.py and clip-score.py). Every step except
Ring-A-Bell's search needs a GPU there (docs/sd-v1.md).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ldm beside this script, in whichever clone

from ldm.attacks.judges import JUDGES
from ldm.attacks.textual_inversion import TextualInversionSettings
from ldm.cli import DEFAULT_CONFIG, DEFAULT_CKPT, add_model_args, new_parser, run
from ldm.data.prompt_sets import all_concepts
from ldm.erasure import methods as registry
from ldm.identity import compvis_identity, sha256_of
from ldm.leaderboard import (Cell, check_methods, concept_prompts, finished_cells, leaderboard, leaderboard_markdown,
                            save_leaderboard)
from ldm.paths import outputs_dir, resolve_path
from ldm.util import UsageError, check_at_least

# two objects and two styles the methods' tiny-sd defaults were set on, then an object and a style they were not
DEFAULT_CONCEPTS = ("moon", "star", "Van Gogh", "Hokusai", "cross", "Pollock")


def main(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("--methods", default=",".join(registry.benchmarked()),
                        help=f"comma-separated, of {', '.join(registry.METHODS)}")
    parser.add_argument("--concepts", default=",".join(DEFAULT_CONCEPTS), help="comma-separated tiny-sd concepts "
                        "(default: two objects and two styles, then an object and a style no default was tuned on)")
    parser.add_argument("--save_path", default=str(outputs_dir() / "benchmark"))
    parser.add_argument("--num_samples", type=int, default=10, help="report: images per prompt")
    parser.add_argument("--ddim_steps", type=int, default=50, help="report and attacks: DDIM steps")
    parser.add_argument("--attack_steps", type=int, default=40, help="UnlearnDiffAtk's steps")
    parser.add_argument("--generations", type=int, default=100, help="Ring-A-Bell's generations")
    parser.add_argument("--ti_steps", type=int, default=TextualInversionSettings.steps,
                        help="the textual-inversion attack's steps")
    parser.add_argument("--erase_args", default="", help="extra flags for every erase, e.g. '--iterations 2' for "
                                                         "a smoke run (part of each cell's hash)")
    add_model_args(parser)
    parser.add_argument("--judge", choices=JUDGES, help="a base other than tiny-sd: the classifier that judges attacks")
    parser.add_argument("--prompts_path", help="a base other than tiny-sd: each concept's prompts ('{concept}' = "
                                               "the concept's file stem)")
    parser.add_argument("--ti_images", help="a base other than tiny-sd: each concept's images for the textual-"
                                            "inversion attack, a folder ('{concept}' = the concept's file stem)")
    parser.add_argument("--image_size", type=int, help="attacks' image size (default: the model's own)")
    args = parser.parse_args(argv)

    check_at_least(args, 1, "num_samples", "ddim_steps", "attack_steps", "generations", "ti_steps")
    methods = check_methods([m.strip() for m in args.methods.split(",") if m.strip()])
    concepts = [c.strip() for c in args.concepts.split(",") if c.strip()]
    if not concepts:
        raise UsageError("--concepts names no concept; e.g. --concepts 'Van Gogh,star'")
    base_sha256 = compvis_identity(args.config_path, args.ckpt_path)["sha256"]
    settings = {"base_sha256": base_sha256, "num_samples": args.num_samples, "ddim_steps": args.ddim_steps,
                "attack_steps": args.attack_steps, "generations": args.generations, "ti_steps": args.ti_steps,
                "erase_args": args.erase_args}
    if base_sha256 != compvis_identity(DEFAULT_CONFIG, DEFAULT_CKPT)["sha256"]:  # another base: its judge and prompts join the cells' hash
        if args.judge in (None, "tiny-sd") or not args.prompts_path or not args.ti_images:
            raise UsageError("a base other than tiny-sd needs --judge nudenet|resnet50, --prompts_path and --ti_images "
                             "(the tiny-sd evaluator, prompt sets and images know only tiny-sd's concepts)")
        prompt_files = {c: resolve_path(concept_prompts(args.prompts_path, c)) for c in concepts}
        missing = [str(path) for path in prompt_files.values() if not path.is_file()]
        if missing:
            raise UsageError(f"--prompts_path: no prompt file {', '.join(missing)}")
        missing = [c for c in concepts if not resolve_path(concept_prompts(args.ti_images, c)).is_dir()]
        if missing:
            raise UsageError(f"--ti_images: no folder {concept_prompts(args.ti_images, missing[0])} of images of "
                             f"'{missing[0]}' for the textual-inversion attack")
        settings["sd"] = {"config_path": args.config_path, "ckpt_path": args.ckpt_path, "judge": args.judge,
                          "prompts_path": args.prompts_path, "image_size": args.image_size,
                          "ti_images": args.ti_images,
                          "prompts_sha256": {c: sha256_of(path) for c, path in prompt_files.items()}}
    else:
        unknown = [c for c in concepts if c not in all_concepts()]
        if unknown:
            raise UsageError(f"--concepts: tiny-sd does not know {', '.join(unknown)}; use some of "
                             f"{', '.join(all_concepts())} (another base needs --judge and --prompts_path)")
    results = []
    for concept in concepts:
        for method in methods:
            cell = Cell(method, concept, args.save_path, settings)
            result = cell.finished()
            print(f"{method} on '{concept}': {'finished earlier' if result else 'running'} ({cell.folder})", flush=True)
            results.append(result or cell.run())
    ran = {(r["method"], r["concept"]) for r in results}
    earlier = [r for r in finished_cells(args.save_path, settings) if (r["method"], r["concept"]) not in ran]
    if earlier:  # a subset never drops the other cells of these settings from the leaderboard
        print(f"the leaderboard also holds {len(earlier)} finished cells of these settings from earlier invocations")
    table = leaderboard(results + earlier)
    base_name = "tiny-sd" if "sd" not in settings else f"{args.ckpt_path}, judge {args.judge}"
    figures = save_leaderboard(table, args.save_path, f"{base_name} ({base_sha256[:12]}): {args.num_samples} images "
                                                      f"per prompt, {args.ddim_steps} DDIM steps")
    print(leaderboard_markdown(table))
    print(f"leaderboard: {args.save_path}/leaderboard.csv, {', '.join(map(str, figures))}")


if __name__ == "__main__":
    run(main)
