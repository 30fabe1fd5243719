"""Train tiny-sd, the embedded default model, on the concept world; resumable.

    python train-scripts/train-tiny-sd.py --autoencoder_from models/tiny-sd/model.ckpt --overwrite

Stage 1 trains the autoencoder (configs/tiny-sd/autoencoder.yaml), or takes it from a CompVis
checkpoint with ``--autoencoder_from``; stage 2 trains the latent diffusion UNet together with the
text transformer (CompVis' ``cond_stage_trainable``) on the frozen autoencoder's latents
(configs/tiny-sd/tiny-sd.yaml), with a caption-attribute supervision of the text encoder
(ldm/models/diffusion/text_supervised.py). Both go through the Lightning Trainer; a killed run continues from
its work folder, which refuses to continue a run with another config, seed, data or autoencoder.
The exported model has a frozen text encoder, as SD v1 has. The evaluator is the next stage:
train-scripts/train-evaluator.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ldm beside this script, in whichever clone

import shutil

from omegaconf import OmegaConf

from ldm.cli import new_parser, run
from ldm.data.tiny_sd import ConceptWorld, WithFirstStageMoments, world_fingerprint
from ldm.generate import concept_grid
from ldm.models.diffusion import text_supervised
from ldm.paths import REPO_ROOT, outputs_dir
from ldm.plots import save_image_grid
from ldm.convert import export_checkpoint
from ldm.training import fit
from ldm.util import (UsageError, instantiate_from_config, load_checkpoint_file, load_config, load_state_dict_strict,
                      state_dict_from_checkpoint, tensors_sha256)


def main(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("--autoencoder_config", default=str(REPO_ROOT / "configs/tiny-sd/autoencoder.yaml"))
    parser.add_argument("--autoencoder_from", help="take the autoencoder (first_stage_model.*) from this CompVis "
                        "checkpoint instead of training stage 1")
    parser.add_argument("--config", default=str(REPO_ROOT / "configs/tiny-sd/tiny-sd.yaml"))
    parser.add_argument("--work_dir", default=str(outputs_dir() / "train-tiny-sd"))
    parser.add_argument("--out_dir", default=str(REPO_ROOT / "models/tiny-sd"))
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in --out_dir")
    parser.add_argument("--dataset_size", type=int, default=20000)
    parser.add_argument("--autoencoder_steps", type=int, help="default: the config's training.steps")
    parser.add_argument("--steps", type=int, help="diffusion steps; default: the config's training.steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text_loss_weight", type=float, default=0.1,
                        help="weight of the caption-attribute supervision of the text encoder (0: diffusion loss only)")
    args = parser.parse_args(argv)
    work, out = Path(args.work_dir), Path(args.out_dir)
    if (out / "model.ckpt").exists() and not args.overwrite:
        raise UsageError(f"'{out}' already holds a model; pass --overwrite to replace it, or another --out_dir")
    ae_config, ldm_config = load_config(args.autoencoder_config), load_config(args.config)
    dataset = ConceptWorld(size=args.dataset_size, seed=args.seed,
                           max_length=ldm_config.model.params.cond_stage_config.params.max_length)
    world = world_fingerprint(args.dataset_size, args.seed)

    autoencoder = instantiate_from_config(ae_config.model)
    if args.autoencoder_from:
        state = state_dict_from_checkpoint(load_checkpoint_file(args.autoencoder_from))
        first_stage = {k[len("first_stage_model."):]: v.float() for k, v in state.items()
                       if k.startswith("first_stage_model.")}
        load_state_dict_strict(autoencoder, first_stage, ignored=("loss.*",), source=args.autoencoder_from)
    else:
        fit(autoencoder, dataset.cropped(ae_config.training.crop_size), work / "autoencoder",
            args.autoencoder_steps or ae_config.training.steps, ae_config.training.batch_size,
            ae_config.model.base_learning_rate, seed=args.seed,
            fingerprint={"config": OmegaConf.to_container(ae_config), "world": world})

    # while training, the text transformer learns with the UNet, supervised to keep every named concept
    training_config = text_supervised.training_config(ldm_config, args.text_loss_weight)
    model = instantiate_from_config(training_config.model)
    load_state_dict_strict(model.first_stage_model, autoencoder.state_dict(), ignored=("loss.*",),
                           source="the autoencoder")
    autoencoder_sha = tensors_sha256(model.first_stage_model.state_dict())
    fit(model, WithFirstStageMoments(dataset, model.first_stage_model), work / "diffusion",
        args.steps or ldm_config.training.steps, ldm_config.training.batch_size,
        ldm_config.model.base_learning_rate, seed=args.seed,
        fingerprint={"config": OmegaConf.to_container(training_config), "world": world,
                     "autoencoder_sha256": autoencoder_sha})

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
