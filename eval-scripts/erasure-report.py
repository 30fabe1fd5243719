"""Measure an erasure on tiny-sd: efficacy on the erased concept, specificity on the others.

    python eval-scripts/erasure-report.py --model_name <run_name>          # concept read from the run
    python eval-scripts/erasure-report.py --model_name <run_name> --concept circle --base_model tiny-sd

Generates data/tiny-sd/concepts/<concept>.csv (for a run trained with --erase_from B, the attribute-erasure
sets of ldm.data.prompt_sets.attribute_erasure_prompts, written to --save_path/prompts/) with the base and
the edited model (images are cached
under --save_path/images/<model>/<prompts>-<key>, the key a digest of the model's identity, the
prompt file's SHA-256 and the sampling settings, so they are reused only for the same weights), classifies them with the tiny-sd evaluator and writes, under
--save_path/reports/<run_name>/ (<run_name>_<concept>/ per concept of a run that erased several): summary.csv (the table printed), per-concept.csv (accuracy on every
concept, base vs edited), drift.csv (per prompt set, the Frechet distance from the base's images to
the edited model's in the evaluator's feature space), predictions of both models, and comparison.png
(base | edited).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ldm beside this script, in whichever clone

import json

import pandas as pd
import torch

from ldm.cli import new_parser, parse_device, run
from ldm.data.prompt_sets import all_concepts, attribute_erasure_prompts, concept_filename
from ldm.erasure.methods import ESD_BARS, method_of_run
from ldm.erasure.report import (attribute_erasure_summary, comparison_rows, erasure_summary, format_summary,
                                per_concept_accuracy, stack_pairs)
from ldm.evaluation import classify_folder, read_images
from ldm.evaluator import check_autoencoder, load_evaluator
from ldm.metrics import evaluator_fid
from ldm.paths import EVALUATOR_PATH, REPO_ROOT, outputs_dir
from ldm.plots import save_image_grid
from ldm.prompts import read_prompts
from ldm.loading import folder_kind, model_folder
from ldm.runs import read_run_config
from ldm.text2image import (check_generation_args, check_settings, generation_settings, load_generator, make_jobs,
                            run_jobs, settings_key)
from ldm.util import UsageError, atomic_to_csv, atomic_write_text, file_sha256


def generate_and_classify(model_name, generator, prompts, args, evaluator):
    """Images of ``prompts`` by ``model_name`` and their predictions. The images are cached in a folder
    keyed by the model's identity and every setting that shapes them, so they are reused only for the
    very same weights, prompts and sampling; returns (predictions, the model's identity, image folder)."""
    check_autoencoder(evaluator, generator.model.first_stage_model)
    settings = generation_settings(generator.identity, args.prompts_path, args.guidance_scale, args.ddim_steps,
                                   args.num_samples)
    out_dir = (Path(args.save_path) / "images" / Path(model_name).name
               / f"{Path(args.prompts_path).stem}-{settings_key(settings)}")
    check_settings(out_dir, settings)
    run_jobs(generator, make_jobs(prompts, args.num_samples, args.guidance_scale), out_dir, args.num_samples,
             args.ddim_steps, batch_size=args.batch_size)
    return classify_folder(evaluator, out_dir), generator.identity, out_dir


def main(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("--model_name", required=True, help="the edited model: a run folder under models/")
    parser.add_argument("--base_model", default="tiny-sd")
    parser.add_argument("--concept", help="the erased tiny-sd concept (default: the run's --prompt)")
    parser.add_argument("--erase_from", help="report attribute erasure: the concept removed only where it appears "
                                             "with this one (default: the run's --erase_from)")
    parser.add_argument("--prompts_path", help="default: data/tiny-sd/concepts/<concept>.csv, or the "
                                               "attribute-erasure sets for --erase_from")
    parser.add_argument("--save_path", default=str(outputs_dir() / "erasure"))
    parser.add_argument("--num_samples", type=int, default=10,
                        help="images per prompt; 10 gives the 'alone' set 40 images, the fewest for which no image "
                             "found still bounds the concept below 10%% (Wilson 95%%)")
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--ddim_steps", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=40)
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--evaluator_path", default=str(EVALUATOR_PATH))
    parser.add_argument("--force_base", action="store_true",
                        help="load a run whose base checkpoint differs from the one it was trained on")
    args = parser.parse_args(argv)

    check_generation_args(args)
    folder = model_folder(args.model_name)
    run_config = read_run_config(folder) if folder_kind(folder) == "run" else None
    run_args = run_config.run if run_config is not None else {}
    concept = args.concept or run_args.get("prompt")
    if concept is None:
        raise UsageError(f"'{args.model_name}' is not an erasure run, so it names no erased concept; pass --concept "
                         "(one of tiny-sd's concepts) or --model_name a run")
    erase_from = args.erase_from or (run_args.get("erase_from") if concept == run_args.get("prompt") else None)
    for name in (concept, erase_from):
        if name is not None and name not in all_concepts():
            raise UsageError(f"'{name}' is not a tiny-sd concept; pass --concept (and --erase_from), each one of: "
                             f"{', '.join(all_concepts())}")
    save_path = Path(args.save_path)
    if erase_from is not None:
        try:
            attribute_prompts = attribute_erasure_prompts(concept, erase_from)
        except ValueError as error:  # the two concepts are values of one attribute
            raise UsageError(f"--erase_from: {error}") from None
    if args.prompts_path is None and erase_from is not None:
        args.prompts_path = save_path / "prompts" / concept_filename(f"{concept} from {erase_from}")
        args.prompts_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_to_csv(attribute_prompts, args.prompts_path)
    args.prompts_path = args.prompts_path or REPO_ROOT / "data/tiny-sd/concepts" / concept_filename(concept)
    prompts = read_prompts(args.prompts_path)
    device = parse_device(args.device)
    evaluator = load_evaluator(args.evaluator_path, device)

    generators = {name: load_generator(device, model_name=name, force_base=args.force_base)  # both load, or
                  for name in (args.base_model, args.model_name)}  # nothing is generated
    results = {name: generate_and_classify(name, generator, prompts, args, evaluator)
               for name, generator in generators.items()}
    image_dirs = {name: folder for name, (_, _, folder) in results.items()}
    base, edited = results[args.base_model][0], results[args.model_name][0]
    identities = {"base": results[args.base_model][1], "edited": results[args.model_name][1]}

    bars = method_of_run(run_config).bars if run_config is not None else ESD_BARS  # the run's method's bars
    summary = (attribute_erasure_summary(concept, erase_from, base, edited, prompts, bars=bars) if erase_from
               else erasure_summary(concept, base, edited, prompts, bars=bars))
    for role, identity in identities.items():  # every figure says which weights made it
        summary[f"{role}_sha256"] = identity["sha256"][:12]
    per_concept = per_concept_accuracy(base, prompts).merge(
        per_concept_accuracy(edited, prompts), on=["attribute", "concept"], suffixes=("_base", "_edited"))
    report_name = Path(args.model_name).name
    if run_args.get("prompt") not in (None, concept):  # one report per concept of a run that erased several
        report_name += "_" + Path(concept_filename(concept)).stem
    report_dir = save_path / "reports" / report_name
    report_dir.mkdir(parents=True, exist_ok=True)
    def feature_distance(group):  # a Frechet distance needs two images or more on each side
        names = [f"{c}_{i}.png" for c in group["case_number"] for i in range(args.num_samples)]
        if len(names) < 2:
            return float("nan")
        return evaluator_fid(evaluator, image_dirs[args.base_model], image_dirs[args.model_name], progress=False,
                             names=names)[0]

    groups = prompts.groupby(prompts["set"] if "set" in prompts else pd.Series("all", index=prompts.index), sort=False)
    drift = pd.DataFrame([{"set": name, "prompts": len(group), "feature_distance": feature_distance(group)}
                          for name, group in groups])
    for name, table in (("summary.csv", summary), ("per-concept.csv", per_concept), ("drift.csv", drift),
                        ("predictions-base.csv", base), ("predictions-edited.csv", edited)):
        atomic_to_csv(table, report_dir / name)
    atomic_write_text(report_dir / "models.json", json.dumps(
        {"base": {"name": args.base_model, **identities["base"]},
         "edited": {"name": args.model_name, **identities["edited"]},
         "prompts": {"path": str(args.prompts_path), "sha256": file_sha256(args.prompts_path)},
         "num_samples": args.num_samples}, indent=2))

    cases = comparison_rows(prompts)
    names = [f"{c}_0.png" for c in cases]
    pairs = stack_pairs(read_images(image_dirs[args.base_model], names)[0],
                        read_images(image_dirs[args.model_name], names)[0])
    labels = prompts.set_index("case_number").loc[cases, "prompt"].tolist()
    save_image_grid(pairs, report_dir / "comparison.png", row_labels=labels, col_labels=["base", "edited"],
                    title=f"erasing '{concept}'" + (f" from '{erase_from}'" if erase_from else ""))
    print(f"base {args.base_model} ({identities['base']['sha256'][:12]}), edited {args.model_name} "
          f"({identities['edited']['sha256'][:12]}); {args.num_samples} images per prompt")
    print(format_summary(summary))
    print("evaluator-feature distance, base to edited, per prompt set: " + ", ".join(
        f"{row.set} {row.feature_distance:.2f}" for row in drift.itertuples()))
    print(f"report in {report_dir}")


if __name__ == "__main__":
    run(main)
