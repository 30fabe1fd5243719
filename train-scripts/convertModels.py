"""Convert a CompVis model (a config + checkpoint, a name under models/, or an erasure run) to a diffusers
StableDiffusionPipeline folder (or UNet), or write it as one CompVis-format file that AUTOMATIC1111, ComfyUI
and diffusers' StableDiffusionPipeline.from_single_file load.

    python train-scripts/convertModels.py --model_name <run_name> --diffusers_path models/<run_name>/diffusers
    python train-scripts/convertModels.py --ckpt_path sd-v1-4.ckpt \\
        --config_path configs/stable-diffusion/v1-inference.yaml --diffusers_path sd-v1-4-diffusers
    python train-scripts/convertModels.py --model_name <run_name> --to safetensors   # models/<run>/<run>.safetensors
    python train-scripts/convertModels.py --model_name <run_name> --to ckpt --save_path edited.ckpt

A single file holds the whole edited model (an ESD, CiE or SepCE run's edit folded into its weights) with
SD v1's key layout (model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.*), fp16
parameters unless --fp32. A CPE run's gates depend on the prompt and fold into no weight: use the diffusers
adapter. Every output is written atomically and never replaces a file or folder without --overwrite.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ldm beside this script, in whichever clone

from ldm.cli import new_parser, run
from ldm.convert import SINGLE_FILE_FORMATS, save_diffusers, save_single_file
from ldm.loading import load_model
from ldm.util import UsageError


def main(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("--model_name", help="a folder under models/ (a CompVis model or a run); default tiny-sd "
                        "unless --ckpt_path/--config_path are given")
    parser.add_argument("--config_path", help="CompVis model config (YAML), with --ckpt_path")
    parser.add_argument("--ckpt_path", help="CompVis checkpoint (.ckpt or .safetensors), with --config_path")
    parser.add_argument("--unsafe_pickle", action="store_true",
                        help="fully unpickle a .ckpt you trust (default: tensors only, no code from the file runs)")
    parser.add_argument("--force_base", action="store_true",
                        help="load a run whose base checkpoint differs from the one it was trained on")
    parser.add_argument("--to", default="diffusers", choices=["diffusers", *SINGLE_FILE_FORMATS])
    parser.add_argument("--diffusers_path", help="--to diffusers: output folder")
    parser.add_argument("--save_path", help="--to safetensors/ckpt: output file (default: models/<run>/<run>.<to>)")
    parser.add_argument("--fp32", action="store_true", help="single file: keep fp32 parameters (default fp16)")
    parser.add_argument("--unet_only", action="store_true", help="write only the UNet (UNet2DConditionModel)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    if args.to == "diffusers" and not args.diffusers_path:
        raise UsageError("--to diffusers needs --diffusers_path (the output folder)")
    if args.to != "diffusers" and args.save_path and Path(args.save_path).suffix != f".{args.to}":
        raise UsageError(f"--save_path '{args.save_path}' should end in .{args.to} for --to {args.to}")
    loaded = load_model(args.model_name, args.config_path, args.ckpt_path, unsafe_pickle=args.unsafe_pickle,
                        force_base=args.force_base)
    if loaded.kind == "diffusers":
        raise UsageError(f"'{loaded.name}' is already a diffusers folder")
    if args.to == "diffusers":
        out = save_diffusers(loaded.model, loaded.config, args.diffusers_path, unet_only=args.unet_only,
                             overwrite=args.overwrite)
        print(f"saved {'UNet' if args.unet_only else 'pipeline'} of {loaded.name} (identity {loaded.sha256[:12]}) to {out}")
        return
    folder = loaded.folder if loaded.folder is not None else Path(args.ckpt_path or ".").parent
    path = Path(args.save_path) if args.save_path else Path(folder) / f"{loaded.name}.{args.to}"
    out = save_single_file(loaded, path, half=not args.fp32, overwrite=args.overwrite)
    print(f"saved {loaded.name} (identity {loaded.sha256[:12]}) as one {'fp32' if args.fp32 else 'fp16'} file: {out}")


if __name__ == "__main__":
    run(main)
