"""Single-file export (train-scripts/convertModels.py --to safetensors|ckpt): an erased tiny-sd run as one
CompVis-format file that diffusers' own single-file loader reads offline and draws the same images from."""
import shutil

import pytest
import torch
from safetensors import safe_open

from conftest import TINY, call_script, one_line_error
from ldm.paths import models_dir

RUN = "test-single-file-esdx"


@pytest.fixture(scope="module")
def esd_run():
    """A real ESD-x run of tiny-sd (a few iterations: the weights differ from the base's, which is what counts)."""
    done = call_script("train-scripts/train-esd.py", "--prompt", "moon", "--iterations", 3, "--ddim_steps", 4,
                       "--run_name", RUN, "--overwrite", "--no_diffusers", "--no_samples")
    assert done.returncode == 0, done.stderr
    yield models_dir() / RUN
    shutil.rmtree(models_dir() / RUN, ignore_errors=True)


@pytest.mark.slow  # an end-to-end run of the scripts: the slow tier
def test_exported_run_loads_in_diffusers_single_file_and_draws_the_same(esd_run, tmp_path):
    from diffusers import StableDiffusionPipeline
    from ldm.convert import save_diffusers
    from ldm.loading import load_model
    from ldm.models.diffusion.ddim import ddim_sample
    from ldm.util import load_model_from_config

    done = call_script("train-scripts/convertModels.py", "--model_name", RUN, "--to", "safetensors")
    assert done.returncode == 0, done.stderr
    path = esd_run / f"{RUN}.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
        dtype = f.get_tensor("model.diffusion_model.out.2.weight").dtype
    assert {k.split(".")[0] for k in keys} >= {"model", "first_stage_model", "cond_stage_model"}
    assert any(k.startswith("cond_stage_model.transformer.") for k in keys) and dtype == torch.float16
    run = load_model(RUN)
    assert metadata["identity_sha256"] == run.sha256
    assert load_model(RUN).sha256 == run.sha256  # the exported file is no part of the run's identity

    # round trip: our ldm loads it strictly, with the run's weights rounded to fp16
    ours = load_model_from_config(run.config, path).eval()
    trained = next(k for k in ours.state_dict() if "attn2.to_k" in k)
    assert torch.equal(ours.state_dict()[trained], run.model.state_dict()[trained].half().float())

    # diffusers' single-file loader, offline, with the pipeline layout of the base as its config
    base = load_model("tiny-sd").model
    layout = save_diffusers(base, run.config, tmp_path / "layout")
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(layout), local_files_only=True,
                                                    torch_dtype=torch.float32, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a moon", "a red star"]
    latent = pipe.unet.config.sample_size
    x_T = torch.randn(2, pipe.unet.config.in_channels, latent, latent, generator=torch.Generator().manual_seed(0))
    side = latent * pipe.vae_scale_factor
    with torch.no_grad():
        cond = ours.get_learned_conditioning(prompts)
        uncond = ours.get_learned_conditioning([""] * 2)
        mine, _ = ddim_sample(ours, x_T, cond, uncond, 7.5, num_steps=10)
        theirs = pipe(prompts, height=side, width=side, num_inference_steps=10, guidance_scale=7.5,
                      latents=x_T.clone(), output_type="latent").images
    assert (mine - x_T).abs().max() > 0.1
    assert (mine - theirs).abs().max() <= 1e-3
    # and the edit is in it: the base draws differently from the same latents
    with torch.no_grad():
        before, _ = ddim_sample(base, x_T, base.get_learned_conditioning(prompts),
                                base.get_learned_conditioning([""] * 2), 7.5, num_steps=10)
    assert (before - mine).abs().max() > 1e-2


@pytest.mark.slow
def test_ckpt_export_loads_with_weights_only_and_refuses_to_overwrite(esd_run, tmp_path):
    out = tmp_path / "edited.ckpt"
    done = call_script("train-scripts/convertModels.py", "--model_name", RUN, "--to", "ckpt", "--save_path", out,
                      "--fp32")
    assert done.returncode == 0, done.stderr
    state = torch.load(out, weights_only=True)["state_dict"]
    assert state["model.diffusion_model.out.2.weight"].dtype == torch.float32
    assert "already exists" in one_line_error(call_script("train-scripts/convertModels.py", "--model_name", RUN,
                                                         "--to", "ckpt", "--save_path", out))


@pytest.mark.parametrize("flags,message", [
    (["--to", "safetensors", "--save_path", "x.ckpt"], "should end in .safetensors"),
    (["--to", "onnx"], "invalid choice: 'onnx'"),
    (["--to", "diffusers"], "needs --diffusers_path"),
])
def test_convert_bad_input_is_one_line(flags, message):
    assert message in one_line_error(call_script("train-scripts/convertModels.py", *flags))


def test_cpe_run_says_its_gates_cannot_fold(tmp_path):
    from ldm.convert import save_single_file
    from ldm.loading import LoadedModel
    from ldm.util import UsageError
    folder = tmp_path / "cpe-run"
    folder.mkdir()
    from omegaconf import OmegaConf
    config = OmegaConf.merge(OmegaConf.load(TINY / "config.yaml"),
                             {"run": {"method": "cpe"}, "base_model": {"ckpt_path": "x"}})
    OmegaConf.save(config, folder / "config.yaml")  # a CPE run's record (its gates are not needed to refuse it)
    from ldm.erasure.methods import method_of_run
    loaded = LoadedModel(None, "run", "cpe-run", {"sha256": "0"}, folder, config, method_of_run(config))
    with pytest.raises(UsageError, match="cannot be folded into static weights"):
        save_single_file(loaded, tmp_path / "cpe.safetensors")
