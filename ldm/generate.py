"""Text-to-image generation with a CompVis model: seeded per row, batched, decoded to uint8 images."""
import numpy as np
import torch

from ldm.data.concepts import COLORS, OBJECTS, STYLES, fill_template
from ldm.models.diffusion.ddim import ddim_sample


def seeded_noise(seeds, shape, device="cpu"):
    """Start noise ``x_T``, one row per seed: a row's noise depends only on its own seed."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)


def sample_noise(seed, num_samples, shape):
    """The ``num_samples`` start latents of one prompt row, exactly as ESD's generate-images.py draws
    them (one ``randn`` of ``num_samples`` from the row's seed): sample i gets row i."""
    return torch.randn((num_samples, *shape), generator=torch.Generator().manual_seed(int(seed)))


def latent_shape(model, image_size=None):
    """(C, h, w) of the latents for ``image_size`` pixels (default: the model's own size), for a CompVis
    LatentDiffusion model or a diffusers StableDiffusionPipeline."""
    if hasattr(model, "vae_scale_factor"):  # a diffusers pipeline
        channels, side, factor = model.unet.config.in_channels, model.unet.config.sample_size, model.vae_scale_factor
    else:
        channels, side, factor = model.channels, model.image_size, 2 ** model.num_downs
    if image_size is not None:
        side = image_size // factor
    return (channels, side, side)


def pixel_size(model):
    """The side in pixels of the images a CompVis LatentDiffusion model draws."""
    return model.image_size * 2 ** model.num_downs


def to_uint8(images):
    """Decoder output in [-1, 1] (B, 3, H, W) to uint8 (B, H, W, 3)."""
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def generate(model, prompts, x_T, guidance_scale=7.5, ddim_steps=50, eta=0.0):
    """Images (B, H, W, 3) uint8 for ``prompts`` from start latents ``x_T`` (DDIM, classifier-free
    guidance against the empty prompt)."""
    x_T = x_T.to(model.betas.device)
    cond = model.get_learned_conditioning(list(prompts))
    uncond = model.get_learned_conditioning([""] * len(prompts)) if guidance_scale != 1.0 else None
    latents, _ = ddim_sample(model, x_T, cond, uncond, guidance_scale, num_steps=ddim_steps, eta=eta)
    return to_uint8(model.decode_first_stage(latents))


def generate_grid(model, prompts_grid, seed=0, image_size=None, **kwargs):
    """Images for a rows x cols list of prompts, one seed per cell, as a (rows, cols, H, W, 3) array."""
    rows, cols = len(prompts_grid), len(prompts_grid[0])
    flat = [p for row in prompts_grid for p in row]
    x_T = seeded_noise(range(seed, seed + len(flat)), latent_shape(model, image_size))
    images = generate(model, flat, x_T, **kwargs)
    return np.asarray(images).reshape(rows, cols, *images.shape[1:])


def concept_grid(model, seed=0, color_offset=0, **kwargs):
    """tiny-sd's overview: rows are objects, columns styles, colors cycling down the rows.
    Returns (images (rows, cols, H, W, 3), row labels, column labels)."""
    colors = tuple(COLORS)
    prompts = [[fill_template("a {color} {object} {in_style}", obj, colors[(i + color_offset) % len(colors)], style)[0]
                for style in STYLES] for i, obj in enumerate(OBJECTS)]
    row_labels = [f"{colors[(i + color_offset) % len(colors)]} {obj}" for i, obj in enumerate(OBJECTS)]
    return generate_grid(model, prompts, seed=seed, **kwargs), row_labels, list(STYLES)
