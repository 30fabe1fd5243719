"""Our UNet vs diffusers' UNet2DConditionModel on the same weights and inputs, in one process.

    python bench/unet_forward.py                                  # CPU, reduced SD v1 structure, fp32
    python bench/unet_forward.py --device cuda --size sd-v1 --dtype fp16 --batch 2 --latent 64

Prints time per forward and peak memory of each, and the ratios ours / diffusers (lower is better).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the ldm beside this script, in whichever clone

import torch
from omegaconf import OmegaConf

from ldm.benchmark import peak_memory, time_interleaved
from ldm.cli import new_parser, parse_device, run
from ldm.convert import convert_unet
from ldm.paths import REPO_ROOT
from ldm.util import instantiate_from_config

SIZES = {"sd-v1": {}, "reduced": {"model_channels": 64}}


def main(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=SIZES, default="reduced", help="sd-v1: 859.52M; reduced: width 64")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--latent", type=int, default=32, help="latent side (64 for 512 px)")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    device = parse_device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]

    config = OmegaConf.load(REPO_ROOT / "configs/stable-diffusion/v1-inference.yaml")
    config.model.params.unet_config.params.update(SIZES[args.size], use_checkpoint=False)
    torch.manual_seed(0)
    ours = instantiate_from_config(config.model.params.unet_config)
    for p in ours.parameters():  # random, fan-in scaled, non-zero everywhere (no branch trivially skipped)
        p.data.normal_(0, p[0].numel() ** -0.5 if p.dim() > 1 else 0.1)
    theirs = convert_unet({f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}, config)
    ours, theirs = ours.to(device, dtype).eval(), theirs.to(device, dtype).eval()
    context_dim = config.model.params.unet_config.params.context_dim
    x = torch.randn(args.batch, 4, args.latent, args.latent, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    context = torch.randn(args.batch, 77, context_dim, device=device, dtype=dtype)

    with torch.inference_mode():
        fns = {"ours": lambda: ours(x, t, context=context),
               "diffusers": lambda: theirs(x, t, encoder_hidden_states=context).sample}
        times = time_interleaved(fns, device, iters=args.iters)
        memory = {name: peak_memory(fn, device) for name, fn in fns.items()}
        out = fns["ours"]().float()
        max_diff = (out - fns["diffusers"]().float()).abs().max().item()

    params = sum(p.numel() for p in ours.parameters()) / 1e6
    print(f"UNet {args.size} ({params:.2f}M params), {device.type}, {args.dtype}, batch {args.batch}, "
          f"latent {args.latent}x{args.latent}, median of {args.iters}")
    for name in fns:
        print(f"  {name:9s} {times[name] * 1e3:9.1f} ms/forward   peak {memory[name] / 2**20:9.1f} MiB")
    print(f"  ratio ours/diffusers: time {times['ours'] / times['diffusers']:.3f}, "
          f"peak memory {memory['ours'] / memory['diffusers']:.3f}   (max |diff| {max_diff:.1e}, output std {out.std():.2f})")


if __name__ == "__main__":
    run(main)
