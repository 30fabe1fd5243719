"""Convert a CompVis checkpoint and its config to a diffusers StableDiffusionPipeline folder (or UNet).

    python train-scripts/convertModels.py --ckpt_path models/<run>/model.ckpt \
        --config_path configs/stable-diffusion/v1-inference.yaml --diffusers_path models/<run>/diffusers
"""
from ldm.cli import add_model_args, new_parser, run
from ldm.convert import save_diffusers
from ldm.util import load_config, load_model_from_config


def main():
    parser = add_model_args(new_parser(__doc__))
    parser.add_argument("--diffusers_path", required=True, help="output folder (written atomically)")
    parser.add_argument("--unet_only", action="store_true", help="write only the UNet (UNet2DConditionModel)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args()
    config = load_config(args.config_path)
    model = load_model_from_config(config, args.ckpt_path, unsafe_pickle=args.unsafe_pickle)
    out = save_diffusers(model, config, args.diffusers_path, unet_only=args.unet_only, overwrite=args.overwrite)
    print(f"saved {'UNet' if args.unet_only else 'pipeline'} to {out}")


if __name__ == "__main__":
    run(main)
