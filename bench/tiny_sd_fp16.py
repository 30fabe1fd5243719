"""Does storing tiny-sd's weights in fp16 keep its quality? Both versions draw the same prompts from the
same noise: the fp32 EMA weights of the training run (its Lightning ``last.ckpt``) and the same weights
rounded to fp16, as ``export_checkpoint`` ships them.

    python bench/tiny_sd_fp16.py            # after train-scripts/train-tiny-sd.py

Prints the evaluator's accuracy per attribute for both, how often they agree, and the mean absolute
pixel difference between their images.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ldm beside this script, in whichever clone

import numpy as np
import torch

from ldm.cli import new_parser, run
from ldm.data.prompt_sets import quality_prompts
from ldm.evaluator import HEADS, classify, load_evaluator
from ldm.generate import generate, latent_shape, sample_noise
from ldm.models.diffusion import text_supervised
from ldm.paths import EVALUATOR_PATH, REPO_ROOT, outputs_dir
from ldm.util import (instantiate_from_config, load_checkpoint_file, load_config, load_state_dict_strict,
                      state_dict_from_checkpoint)


def main(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("--training_ckpt", default=str(outputs_dir() / "train-tiny-sd/diffusion/last.ckpt"))
    parser.add_argument("--config", default=str(REPO_ROOT / "configs/tiny-sd/tiny-sd.yaml"))
    parser.add_argument("--samples", type=int, default=2, help="images per quality prompt")
    parser.add_argument("--ddim_steps", type=int, default=50)
    args = parser.parse_args(argv)
    config = text_supervised.training_config(load_config(args.config))
    model = instantiate_from_config(config.model)
    load_state_dict_strict(model, state_dict_from_checkpoint(load_checkpoint_file(args.training_ckpt)),
                           source=args.training_ckpt)
    for ema, module in model.ema_pairs():
        ema.copy_to(module)
    model.eval()
    buffers = {name for name, _ in model.named_buffers()}
    rounded = {k: (v.half().float() if k not in buffers and v.is_floating_point() else v)
               for k, v in model.state_dict().items() if not k.startswith(("model_ema.", "cond_stage_model_ema.", "text_heads."))}

    prompts = quality_prompts()
    shape = latent_shape(model)
    x_T = torch.cat([sample_noise(seed, args.samples, shape) for seed in prompts["evaluation_seed"]])
    texts = [p for p in prompts["prompt"] for _ in range(args.samples)]
    evaluator = load_evaluator(EVALUATOR_PATH)
    images = {}
    for name in ("fp32", "fp16"):
        if name == "fp16":
            model.load_state_dict(rounded, strict=False)
        images[name] = np.concatenate([generate(model, texts[i:i + 64], x_T[i:i + 64], 7.5, args.ddim_steps)
                                       for i in range(0, len(texts), 64)])
    predictions = {name: classify(evaluator, batch) for name, batch in images.items()}
    for head in HEADS:
        truth = np.repeat(prompts[head].to_numpy(), args.samples)
        accuracy = {name: np.mean(np.array(p[head][0]) == truth) for name, p in predictions.items()}
        agree = np.mean(np.array(predictions["fp32"][head][0]) == np.array(predictions["fp16"][head][0]))
        print(f"{head}: fp32 {accuracy['fp32']:.1%}, fp16 {accuracy['fp16']:.1%}, agreement {agree:.1%} "
              f"({len(truth)} images)")
    difference = np.abs(images["fp32"].astype(float) - images["fp16"].astype(float)).mean()
    print(f"mean absolute pixel difference fp32 vs fp16: {difference:.2f}/255")


if __name__ == "__main__":
    run(main)
