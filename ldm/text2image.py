"""Batch text-to-image from prompt CSVs, for a CompVis model or a diffusers pipeline.

Each image is named ``{case_number}_{i}.png``; its start noise depends only on its row's seed and i,
so the same row gives the same image whatever the order, and, batches being planned from the jobs
alone, the same pixels whether the run is split across processes or resumed.
"""
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ldm.generate import generate, latent_shape, sample_noise
from ldm.loading import load_model
from ldm.util import UsageError, atomic_path, atomic_write_text, check_at_least, dict_differences, file_sha256, json_sha256


@dataclass(frozen=True)
class Job:
    """One image to make."""
    case_number: int
    index: int
    prompt: str
    seed: int
    guidance_scale: float

    @property
    def filename(self):
        return f"{self.case_number}_{self.index}.png"


def make_jobs(prompts, num_samples, guidance_scale, from_case=0, till_case=None, guidance_from_csv=False):
    """The images a prompt table asks for, rows with ``from_case <= case_number <= till_case``."""
    jobs = []
    for row in prompts.itertuples(index=False):
        if row.case_number < from_case or (till_case is not None and row.case_number > till_case):
            continue
        scale = float(row.evaluation_guidance) if guidance_from_csv else float(guidance_scale)
        jobs.extend(Job(int(row.case_number), i, row.prompt, int(row.evaluation_seed), scale)
                    for i in range(num_samples))
    return jobs


class CompVisModel:
    """A CompVis LatentDiffusion model (a ``LoadedModel``) as an image generator."""

    def __init__(self, loaded):
        self.model, self.identity = loaded.model, loaded.identity

    def latent_shape(self, image_size):
        return latent_shape(self.model, image_size)

    def __call__(self, prompts, x_T, guidance_scale, ddim_steps):
        return generate(self.model, prompts, x_T, guidance_scale, ddim_steps)


class DiffusersModel:
    """A diffusers StableDiffusionPipeline (a ``LoadedModel``), sampled with SD v1's DDIM scheduler."""

    def __init__(self, loaded):
        from diffusers import DDIMScheduler
        self.pipe, self.identity = loaded.model, loaded.identity
        self.pipe.scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)
        self.pipe.set_progress_bar_config(disable=True)

    def latent_shape(self, image_size):
        return latent_shape(self.pipe, image_size)

    def __call__(self, prompts, x_T, guidance_scale, ddim_steps):
        side = x_T.shape[-1] * self.pipe.vae_scale_factor
        images = self.pipe(list(prompts), height=side, width=side, num_inference_steps=ddim_steps,
                           guidance_scale=guidance_scale, latents=x_T.to(self.pipe.device), eta=0.0,
                           output_type="np").images
        return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def load_generator(device, model_name=None, ckpt_path=None, config_path=None, diffusers_path=None,
                   unsafe_pickle=False, force_base=False):
    """The image generator the flags name (``ldm.loading.load_model``), with the model's identity."""
    loaded = load_model(model_name, config_path, ckpt_path, diffusers_path, device, unsafe_pickle, force_base)
    return DiffusersModel(loaded) if loaded.kind == "diffusers" else CompVisModel(loaded)


def check_generation_args(args):
    """Counts and steps >= 1 and guidance >= 0 (the flags ``args`` has), refused before anything is written."""
    check_at_least(args, 1, *[n for n in ("num_samples", "ddim_steps", "batch_size", "image_size") if hasattr(args, n)])
    if getattr(args, "guidance_scale", None) is not None and not args.guidance_scale >= 0:
        raise UsageError(f"--guidance_scale must be >= 0, got {args.guidance_scale}")
    return args


def image_is_whole(path):
    """Whether ``path`` is an image that decodes to the end (a file cut short by a kill does not)."""
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def check_settings(out_dir, settings, overwrite=False, write=True):
    """Record ``settings`` in ``out_dir/generation.json`` (unless ``write`` is False: a sharded run's
    other ranks only check); refuse a folder made with other settings, naming what differs."""
    record = out_dir / "generation.json"
    if record.exists() and not overwrite:
        previous = json.loads(record.read_text())
        if previous != settings:
            changed = sorted(dict_differences(previous, settings))
            raise UsageError(f"'{out_dir}' holds images made with other settings ({', '.join(changed[:4])} differ); "
                             "choose another --save_path or --model_name, or pass --overwrite to replace them")
    out_dir.mkdir(parents=True, exist_ok=True)
    if write:
        atomic_write_text(record, json.dumps(settings, indent=2, sort_keys=True))


IMAGE_NAME = re.compile(r"^-?\d+_\d+\.png$")


def clear_stale_images(out_dir, jobs):
    """With --overwrite: delete images in ``out_dir`` that ``jobs`` will not write (another range, fewer
    samples, an older CSV), so that scoring never reads them; returns how many were removed."""
    keep = {job.filename for job in jobs}
    stale = [p for p in Path(out_dir).glob("*.png") if IMAGE_NAME.match(p.name) and p.name not in keep]
    for path in stale:
        path.unlink()
    return len(stale)


def settings_key(settings):
    """A short digest of generation settings, to key a cache folder by them."""
    return json_sha256(settings)[:12]


def shard():
    """(rank, world size) of this process: torchrun's or accelerate's ``RANK``/``WORLD_SIZE``, else
    SLURM's ``SLURM_PROCID``/``SLURM_NTASKS`` (one task per GPU under srun), else (0, 1)."""
    import os
    for rank, world in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank in os.environ and world in os.environ:
            rank, world = int(os.environ[rank]), int(os.environ[world])
            if not 0 <= rank < world:
                raise UsageError(f"process rank {rank} is outside a world of size {world}; check the launcher")
            return rank, world
    return 0, 1


def local_device(device):
    """A sharded run's GPU: each process on a node takes the CUDA device of its ``LOCAL_RANK``."""
    import os
    if device.type != "cuda" or "LOCAL_RANK" not in os.environ:
        return device
    return torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())


def plan_batches(jobs, batch_size):
    """Split jobs into batches: grouped by guidance scale (one scalar per batch), the CSV's order within
    a group. The plan depends only on the jobs and ``batch_size``, never on what exists or who runs it."""
    groups = {}
    for job in jobs:
        groups.setdefault(job.guidance_scale, []).append(job)
    return [group[start:start + batch_size] for group in groups.values()
            for start in range(0, len(group), batch_size)]


def run_jobs(generator, jobs, out_dir, num_samples, ddim_steps, image_size=None, batch_size=8, overwrite=False,
             progress=True, rank=0, world_size=1):
    """Make every job's image not already in ``out_dir``; returns (images written, images this rank owns).

    Batches follow ``plan_batches``; batch k belongs to rank ``k % world_size``, so ranks never overlap
    and together cover every batch. A batch with any image missing is generated whole, so each image
    comes from the same batch, and the same pixels, however the run is split or resumed; only the
    missing images, and any that do not decode, are written, each atomically, so a killed run resumes where
    it stopped.
    """
    out_dir = Path(out_dir)
    batches = [batch for k, batch in enumerate(plan_batches(jobs, batch_size)) if k % world_size == rank]
    shape = generator.latent_shape(image_size)
    noise_cache = {}

    def noise(job):
        key = (job.seed, num_samples)
        if key not in noise_cache:
            noise_cache.clear()
            noise_cache[key] = sample_noise(job.seed, num_samples, shape)
        return noise_cache[key][job.index]

    todo = [[job for job in batch if overwrite or not image_is_whole(out_dir / job.filename)] for batch in batches]
    desc = "images" if world_size == 1 else f"images (rank {rank}/{world_size})"
    bar = tqdm(total=sum(map(len, todo)), desc=desc, disable=not progress)
    for batch, missing in zip(batches, todo):
        if not missing:
            continue
        images = generator([j.prompt for j in batch], torch.stack([noise(j) for j in batch]),
                           batch[0].guidance_scale, ddim_steps)
        for job, image in zip(batch, images):
            if job in missing:
                with atomic_path(out_dir / job.filename) as tmp:
                    Image.fromarray(image).save(tmp, format="PNG")
        bar.update(len(missing))
    bar.close()
    return sum(map(len, todo)), sum(map(len, batches))


def generation_settings(identity, prompts_path, guidance_scale, ddim_steps, num_samples, image_size=None,
                        guidance_from_csv=False, skip_empty_prompts=False):
    """What determines a folder's images (not how they are batched or split): the model's identity, the
    sampling settings and the prompt file's SHA-256. Every script that generates keys its folder by it."""
    return {"model": identity, "guidance_scale": None if guidance_from_csv else guidance_scale,
            "guidance_from_csv": guidance_from_csv, "ddim_steps": ddim_steps, "image_size": image_size,
            "num_samples": num_samples, "prompts_sha256": file_sha256(prompts_path),
            "skip_empty_prompts": skip_empty_prompts}
