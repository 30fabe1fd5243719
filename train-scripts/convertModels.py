"""Convert a CompVis model (a config + checkpoint, a name under models/, or an erasure run) to a
diffusers StableDiffusionPipeline folder (or UNet).

    python train-scripts/convertModels.py --model_name <run_name> --diffusers_path models/<run_name>/diffusers
    python train-scripts/convertModels.py --ckpt_path sd-v1-4.ckpt \
        --config_path configs/stable-diffusion/v1-inference.yaml --diffusers_path sd-v1-4-diffusers
"""
from ldm.cli import new_parser, run
from ldm.convert import save_diffusers
from ldm.loading import load_model
from ldm.util import UsageError


def main():
    parser = new_parser(__doc__)
    parser.add_argument("--model_name", help="a folder under models/ (a CompVis model or a run); default tiny-sd "
                        "unless --ckpt_path/--config_path are given")
    parser.add_argument("--config_path", help="CompVis model config (YAML), with --ckpt_path")
    parser.add_argument("--ckpt_path", help="CompVis checkpoint (.ckpt or .safetensors), with --config_path")
    parser.add_argument("--unsafe_pickle", action="store_true",
                        help="fully unpickle a .ckpt you trust (default: tensors only, no code from the file runs)")
    parser.add_argument("--force_base", action="store_true",
                        help="load a run whose base checkpoint differs from the one it was trained on")
    parser.add_argument("--diffusers_path", required=True, help="output folder (written atomically)")
    parser.add_argument("--unet_only", action="store_true", help="write only the UNet (UNet2DConditionModel)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args()
    loaded = load_model(args.model_name, args.config_path, args.ckpt_path, unsafe_pickle=args.unsafe_pickle,
                        force_base=args.force_base)
    if loaded.kind == "diffusers":
        raise UsageError(f"'{loaded.name}' is already a diffusers folder")
    out = save_diffusers(loaded.model, loaded.config, args.diffusers_path, unet_only=args.unet_only,
                         overwrite=args.overwrite)
    print(f"saved {'UNet' if args.unet_only else 'pipeline'} of {loaded.name} (identity {loaded.sha256[:12]}) to {out}")


if __name__ == "__main__":
    run(main)
