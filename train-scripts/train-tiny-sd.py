"""Train tiny-sd, the embedded default model, on the concept world; resumable.

    python train-scripts/train-tiny-sd.py            # both stages, then writes models/tiny-sd/

Stage 1 trains the autoencoder (configs/tiny-sd/autoencoder.yaml), stage 2 the latent diffusion
UNet (configs/tiny-sd/tiny-sd.yaml) with the frozen autoencoder and text encoder, both through the
Lightning Trainer. A killed run continues from its work folder's last checkpoint.
"""
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from ldm.cli import new_parser, run
from ldm.data.tiny_sd import ConceptWorld, WithFirstStageMoments
from ldm.generate import concept_grid
from ldm.paths import REPO_ROOT
from ldm.plots import save_image_grid
from ldm.training import export_checkpoint, fit
from ldm.util import instantiate_from_config, load_config, load_state_dict_strict


def main():
    parser = new_parser(__doc__)
    parser.add_argument("--autoencoder_config", default=str(REPO_ROOT / "configs/tiny-sd/autoencoder.yaml"))
    parser.add_argument("--config", default=str(REPO_ROOT / "configs/tiny-sd/tiny-sd.yaml"))
    parser.add_argument("--work_dir", default=str(REPO_ROOT / "outputs/train-tiny-sd"))
    parser.add_argument("--out_dir", default=str(REPO_ROOT / "models/tiny-sd"))
    parser.add_argument("--dataset_size", type=int, default=20000)
    parser.add_argument("--autoencoder_steps", type=int, help="default: the config's training.steps")
    parser.add_argument("--steps", type=int, help="diffusion steps; default: the config's training.steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = Path(args.work_dir)
    ae_config, ldm_config = load_config(args.autoencoder_config), load_config(args.config)

    autoencoder = instantiate_from_config(ae_config.model)
    dataset = ConceptWorld(size=args.dataset_size, seed=args.seed)
    fit(autoencoder, dataset.cropped(ae_config.training.crop_size), work / "autoencoder",
        args.autoencoder_steps or ae_config.training.steps, ae_config.training.batch_size,
        ae_config.model.base_learning_rate, seed=args.seed)

    training_config = OmegaConf.merge(ldm_config, {"model": {"params": {"use_ema": True}}})
    model = instantiate_from_config(training_config.model)
    load_state_dict_strict(model.first_stage_model, autoencoder.state_dict(), ignored=("loss.*",),
                           source="the trained autoencoder")
    fit(model, WithFirstStageMoments(dataset, model.first_stage_model), work / "diffusion",
        args.steps or ldm_config.training.steps, ldm_config.training.batch_size,
        ldm_config.model.base_learning_rate, seed=args.seed)

    out = Path(args.out_dir)
    export_checkpoint(model, out / "model.ckpt")
    shutil.copyfile(args.config, out / "config.yaml")
    if (work / "diffusion" / "loss.png").exists():
        shutil.copyfile(work / "diffusion" / "loss.png", out / "loss.png")
    model.eval()
    images, rows, cols = concept_grid(model)
    save_image_grid(images, out / "samples.png", row_labels=rows, col_labels=cols,
                    title="tiny-sd: rows objects, columns styles")
    print(f"tiny-sd written to {out}")


if __name__ == "__main__":
    run(main)
