"""Training images of a concept for CiE and SepCE: a folder the user gives (``--data_dir``, made by
``eval-scripts/generate-data.py``), or the base model's own images of the concept, drawn once into a cache
keyed by the model's identity and every sampling setting, and encoded to the latents the UNet sees."""
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ldm.generate import pixel_size
from ldm.paths import outputs_dir
from ldm.text2image import CompVisModel, check_settings, generation_settings, make_jobs, run_jobs
from ldm.util import UsageError, atomic_to_csv, file_sha256, json_sha256


def concept_prompt_table(prompt, seed=0):
    """The one-row prompt table of ``prompt`` (``num_samples`` images of it are drawn from ``seed``)."""
    return pd.DataFrame({"prompt": [prompt], "evaluation_seed": [seed], "case_number": [0]})


def generate_concept_images(generator, prompt, num_images, out_dir, guidance_scale=7.5, ddim_steps=50,
                            batch_size=16, seed=0, overwrite=False, progress=True):
    """Draw ``num_images`` images of ``prompt`` with ``generator`` (an ``ldm.text2image`` generator) into
    ``out_dir`` (``0_<i>.png``, a ``prompts.csv`` and ``generation.json`` keyed by the model's identity,
    so a folder is never reused for another model or setting). Existing images are kept (resumable)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = concept_prompt_table(prompt, seed)
    prompts_path = out_dir / "prompts.csv"
    if not prompts_path.is_file() or overwrite or pd.read_csv(prompts_path).prompt.tolist() != [prompt]:
        atomic_to_csv(table, prompts_path)
    settings = generation_settings(generator.identity, prompts_path, guidance_scale, ddim_steps, num_images)
    check_settings(out_dir, settings, overwrite=overwrite)
    jobs = make_jobs(table, num_images, guidance_scale)
    run_jobs(generator, jobs, out_dir, num_images, ddim_steps, batch_size=batch_size, overwrite=overwrite,
             progress=progress)
    return out_dir


def default_data_dir(identity, prompt, num_images, guidance_scale=7.5, ddim_steps=50, seed=0):
    """The cache folder of a model's training images of ``prompt``: keyed by the model's identity and
    every sampling setting, so another model or setting never reads them."""
    key = json_sha256({"model": identity["sha256"], "prompt": prompt, "num_images": num_images,
                       "guidance_scale": guidance_scale, "ddim_steps": ddim_steps, "seed": seed})[:16]
    return outputs_dir() / "concept-data" / key


def data_record(folder):
    """What names a training-image folder in a run's settings: its path and its generation record's SHA-256."""
    folder = Path(folder)
    record = folder / "generation.json"
    return {"folder": str(folder.resolve()), "generation_sha256": file_sha256(record) if record.is_file() else None}


def read_images(folder):
    """Every PNG/JPEG in ``folder`` as a float tensor (N, 3, H, W) in [-1, 1]; none is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"--data_dir '{folder}' is not a folder; make one with eval-scripts/generate-data.py")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not paths:
        raise UsageError(f"--data_dir '{folder}' holds no images; make them with eval-scripts/generate-data.py")
    images = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1 for p in paths]
    if len({i.shape for i in images}) != 1:
        raise UsageError(f"--data_dir '{folder}' holds images of different sizes; use one size")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


@torch.no_grad()
def encode_images(model, images, batch_size=16):
    """Latents ``z`` of ``images`` (in [-1, 1]) under the model's first stage, scaled as the UNet sees them:
    the posterior's mode, so the same images always give the same latents (a posterior sample would
    draw from the global RNG and make every run differ)."""
    side = pixel_size(model)
    if images.shape[-1] != side or images.shape[-2] != side:
        raise UsageError(f"training images are {images.shape[-1]}x{images.shape[-2]} pixels; this model draws "
                         f"{side}x{side}; generate them with this model (eval-scripts/generate-data.py)")
    device = model.betas.device
    chunks = [model.get_first_stage_encoding(model.encode_first_stage(images[i:i + batch_size].to(device)).mode())
              for i in range(0, len(images), batch_size)]
    return torch.cat(chunks).float()


def prepare_training_latents(loaded, prompt, data_dir=None, num_images=64, progress=True):
    """The training latents of a CiE/SepCE run and the record of their folder: ``data_dir`` when given,
    else the base model's (``loaded``, an ``ldm.loading.LoadedModel``) own images of ``prompt``,
    generated once into a cache keyed by its identity."""
    if data_dir is None:
        data_dir = default_data_dir(loaded.identity, prompt, num_images)
        generate_concept_images(CompVisModel(loaded), prompt, num_images, data_dir, progress=progress)
    return encode_images(loaded.model, read_images(data_dir)), data_record(data_dir)
