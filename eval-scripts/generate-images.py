"""Generate images for an ESD-format prompt CSV (prompt, evaluation_seed, case_number).

    python eval-scripts/generate-images.py --prompts_path data/tiny-sd/quality.csv   # tiny-sd by default

Writes {save_path}/{model_name}/{case_number}_{i}.png for i in range(num_samples); existing images
are kept, so a killed run resumes. The folder's generation.json records the model's identity (the
SHA-256 of its files), the sampling settings and the prompt file's SHA-256: a folder made otherwise is
refused (--overwrite replaces its images). Runs unchanged under `torchrun --nproc_per_node N` (any --nnodes),
`accelerate launch` or `srun`: each process takes every N-th batch and its node-local GPU.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ldm beside this script, in whichever clone

import torch

from ldm.cli import new_parser, parse_device, run
from ldm.paths import outputs_dir
from ldm.prompts import read_prompts
from ldm.text2image import (check_generation_args, check_settings, clear_stale_images, generation_settings,
                            load_generator, local_device, make_jobs, run_jobs, shard)


def main(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("--model_name", default=None, help="folder under models/ (default tiny-sd), or the output "
                        "name when --ckpt_path/--diffusers_path is given")
    parser.add_argument("--prompts_path", required=True)
    parser.add_argument("--save_path", default=str(outputs_dir() / "images"))
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--guidance_from_csv", action="store_true",
                        help="use each row's evaluation_guidance (I2P) instead of --guidance_scale")
    parser.add_argument("--image_size", type=int, default=None, help="pixels (default: the model's own size)")
    parser.add_argument("--ddim_steps", type=int, default=100)
    parser.add_argument("--num_samples", type=int, default=10)
    parser.add_argument("--from_case", type=int, default=0)
    parser.add_argument("--till_case", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--ckpt_path", help="CompVis checkpoint (with --config_path)")
    parser.add_argument("--config_path", help="CompVis config (with --ckpt_path)")
    parser.add_argument("--diffusers_path", help="a diffusers StableDiffusionPipeline folder")
    parser.add_argument("--skip_empty_prompts", action="store_true", help="leave out rows whose prompt is empty")
    parser.add_argument("--unsafe_pickle", action="store_true", help="fully unpickle a .ckpt you trust")
    parser.add_argument("--force_base", action="store_true",
                        help="load a run whose base checkpoint differs from the one it was trained on")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the folder's images: regenerate them, and delete those this run does not make")
    args = check_generation_args(parser.parse_args(argv))

    prompts = read_prompts(args.prompts_path, require_guidance=args.guidance_from_csv,
                           skip_empty=args.skip_empty_prompts)  # bad CSVs fail before any model loads
    rank, world_size = shard()
    device = local_device(parse_device(args.device))
    named = args.ckpt_path or args.diffusers_path
    model_name = args.model_name or (Path(named).stem if named else "tiny-sd")
    generator = load_generator(device, model_name=model_name, ckpt_path=args.ckpt_path,
                               config_path=args.config_path, diffusers_path=args.diffusers_path,
                               unsafe_pickle=args.unsafe_pickle, force_base=args.force_base)
    out_dir = Path(args.save_path) / Path(model_name).name
    settings = generation_settings(generator.identity, args.prompts_path, args.guidance_scale, args.ddim_steps,
                                   args.num_samples, args.image_size, args.guidance_from_csv, args.skip_empty_prompts)
    check_settings(out_dir, settings, overwrite=args.overwrite, write=rank == 0)
    jobs = make_jobs(prompts, args.num_samples, args.guidance_scale, args.from_case, args.till_case,
                     args.guidance_from_csv)
    if args.overwrite and rank == 0:  # other ranks only write images of this job set, so this never races
        clear_stale_images(out_dir, jobs)
    written, owned = run_jobs(generator, jobs, out_dir, args.num_samples, args.ddim_steps, args.image_size,
                       args.batch_size, overwrite=args.overwrite, rank=rank, world_size=world_size)
    share = "" if world_size == 1 else f"rank {rank} of {world_size}: "
    print(f"{share}{written} images written, {owned - written} already there, in {out_dir}")


if __name__ == "__main__":
    run(main)
