"""Measure an erasure on tiny-sd: efficacy on the erased concept, specificity on the others.

    python eval-scripts/erasure-report.py --model_name <run_name>          # concept read from the run
    python eval-scripts/erasure-report.py --model_name <run_name> --concept circle --base_model tiny-sd

Generates data/tiny-sd/concepts/<concept>.csv with the base and the edited model (images are cached
under --save_path and reused), classifies them with the tiny-sd evaluator and writes, under
--save_path/reports/<run_name>/: summary.csv (the table printed), per-concept.csv (accuracy on every
concept, base vs edited), drift.csv (per prompt set, the Frechet distance from the base's images to
the edited model's in the evaluator's feature space), predictions of both models, and comparison.png
(base | edited).
"""
from pathlib import Path

import pandas as pd
import torch

from ldm.cli import new_parser, parse_device, run
from ldm.data.prompt_sets import concept_filename
from ldm.erasure.report import (comparison_rows, erasure_summary, format_summary, known_concepts,
                                per_concept_accuracy, stack_pairs)
from ldm.evaluation import classify_folder, read_images
from ldm.evaluator import load_evaluator
from ldm.metrics import evaluator_fid
from ldm.paths import MODELS_DIR, REPO_ROOT
from ldm.plots import save_image_grid
from ldm.prompts import read_prompts
from ldm.text2image import check_settings, load_generator, make_jobs, model_folder, run_jobs
from ldm.util import UsageError, atomic_to_csv, load_config


def generate_and_classify(model_name, prompts, out_dir, args, device, evaluator):
    """Images of ``prompts`` by ``model_name`` in ``out_dir`` (made once, then reused) and their predictions."""
    generator = load_generator(device, model_name=model_name)
    settings = {"model": generator.identity, "guidance_scale": args.guidance_scale, "ddim_steps": args.ddim_steps,
                "num_samples": args.num_samples, "prompts": str(args.prompts_path)}
    check_settings(out_dir, settings)
    run_jobs(generator, make_jobs(prompts, args.num_samples, args.guidance_scale), out_dir, args.num_samples,
             args.ddim_steps, batch_size=args.batch_size)
    return classify_folder(evaluator, out_dir)


def main():
    parser = new_parser(__doc__)
    parser.add_argument("--model_name", required=True, help="the edited model: a run folder under models/")
    parser.add_argument("--base_model", default="tiny-sd")
    parser.add_argument("--concept", help="the erased tiny-sd concept (default: the run's --prompt)")
    parser.add_argument("--prompts_path", help="default: data/tiny-sd/concepts/<concept>.csv")
    parser.add_argument("--save_path", default="outputs/erasure")
    parser.add_argument("--num_samples", type=int, default=5)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--ddim_steps", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=40)
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--evaluator_path", default=str(MODELS_DIR / "tiny-sd" / "evaluator.safetensors"))
    args = parser.parse_args()

    folder = model_folder(args.model_name)
    concept = args.concept or load_config(folder / "config.yaml").get("run", {}).get("prompt")
    if concept not in known_concepts():
        raise UsageError(f"'{concept}' is not a tiny-sd concept; pass --concept, one of: {', '.join(known_concepts())}")
    args.prompts_path = args.prompts_path or REPO_ROOT / "data/tiny-sd/concepts" / concept_filename(concept)
    prompts = read_prompts(args.prompts_path)
    device = parse_device(args.device)
    evaluator = load_evaluator(args.evaluator_path, device)

    save_path = Path(args.save_path)
    image_dirs = {name: save_path / "images" / Path(name).name / Path(args.prompts_path).stem
                  for name in (args.base_model, args.model_name)}
    results = {name: generate_and_classify(name, prompts, image_dirs[name], args, device, evaluator)
               for name in image_dirs}
    base, edited = results[args.base_model], results[args.model_name]

    summary = erasure_summary(concept, base, edited, prompts)
    per_concept = per_concept_accuracy(base, prompts).merge(
        per_concept_accuracy(edited, prompts), on=["attribute", "concept"], suffixes=("_base", "_edited"))
    report_dir = save_path / "reports" / Path(args.model_name).name
    report_dir.mkdir(parents=True, exist_ok=True)
    drift = pd.DataFrame([{"set": name, "prompts": len(group), "feature_distance": evaluator_fid(
        evaluator, image_dirs[args.base_model], image_dirs[args.model_name], progress=False,
        names=[f"{c}_{i}.png" for c in group["case_number"] for i in range(args.num_samples)])[0]}
        for name, group in prompts.groupby("set", sort=False)])
    for name, table in (("summary.csv", summary), ("per-concept.csv", per_concept), ("drift.csv", drift),
                        ("predictions-base.csv", base), ("predictions-edited.csv", edited)):
        atomic_to_csv(table, report_dir / name)

    cases = comparison_rows(prompts)
    names = [f"{c}_0.png" for c in cases]
    pairs = stack_pairs(read_images(image_dirs[args.base_model], names)[0],
                        read_images(image_dirs[args.model_name], names)[0])
    labels = prompts.set_index("case_number").loc[cases, "prompt"].tolist()
    save_image_grid(pairs, report_dir / "comparison.png", row_labels=labels, col_labels=["base", "edited"],
                    title=f"erasing '{concept}'")
    print(format_summary(summary))
    print("evaluator-feature distance, base to edited, per prompt set: " + ", ".join(
        f"{row.set} {row.feature_distance:.2f}" for row in drift.itertuples()))
    print(f"report in {report_dir}")


if __name__ == "__main__":
    run(main)
