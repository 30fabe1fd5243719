"""ESD as its authors ran it: the original script's x_t reproduced exactly by ``--x_t authors``, and
``--erase_from`` at the strength of the authors' later code by default."""
import pytest
import torch
from omegaconf import OmegaConf

from ldm.erasure import methods
from ldm.erasure.esd import steps_to_reach
from ldm.erasure.settings import resolve
from ldm.models.diffusion.ddim import cfg_denoise, ddim_sample, ddim_step, make_ddim_sampling_parameters, make_ddim_timesteps
from ldm.util import UsageError, load_config

from conftest import TINY


def authors_x_t(model, x_T, cond, uncond, guidance, num_steps, t_enc):
    """The original script's ``quick_sample_till_t(emb_p, start_guidance, start_code, t_enc)``: CompVis DDIM
    from the noisiest step, breaking after the step whose ``index + 1 == till_T`` (``till_T`` 0 never breaks)."""
    timesteps = make_ddim_timesteps(num_steps, model.num_timesteps)
    alphas, alphas_prev, sigmas = make_ddim_sampling_parameters(model.alphas_cumprod.to(torch.float64),
                                                                torch.as_tensor(timesteps), 0.0)
    x = x_T
    for i in range(num_steps):
        index = num_steps - i - 1
        t = torch.full((1,), int(timesteps[index]), dtype=torch.long)
        eps = cfg_denoise(model, x, t, cond, uncond, guidance)
        x, _ = ddim_step(x, eps, *(v[index].to(x.dtype) for v in (alphas, alphas_prev, sigmas)))
        if index + 1 == t_enc:
            break
    return x


@torch.no_grad()
def test_x_t_authors_is_the_original_scripts_x_t(tiny):
    num_steps = 8
    cond, uncond = tiny.get_learned_conditioning(["a red moon"]), tiny.get_learned_conditioning([""])
    x_T = torch.randn((1, tiny.channels, tiny.image_size, tiny.image_size), generator=torch.Generator().manual_seed(0))
    clean = ddim_sample(tiny, x_T, cond, uncond, 3.0, num_steps=num_steps)[0]
    for t_enc in range(num_steps):
        theirs = authors_x_t(tiny, x_T, cond, uncond, 3.0, num_steps, t_enc)
        ours = ddim_sample(tiny, x_T, cond, uncond, 3.0, num_steps=num_steps,
                           till_T=steps_to_reach(t_enc, num_steps, "authors"))[0]
        assert torch.equal(ours, theirs), t_enc
        aligned = ddim_sample(tiny, x_T, cond, uncond, 3.0, num_steps=num_steps,
                              till_T=steps_to_reach(t_enc, num_steps, "t"))[0]
        assert torch.equal(theirs, clean) == (t_enc <= 1)  # the original's x_t is x_0 at the two least noisy steps
        assert not torch.equal(aligned, theirs)


def test_erase_from_defaults_to_the_authors_strength():
    method = methods.get("esd-x")
    paper = OmegaConf.create({})
    settings, _ = resolve(method.settings, {"prompt": "hat", "erase_from": "cowboy"}, paper, method.config_blocks,
                          method.fixed)
    assert settings.negative_guidance == 2.0
    assert resolve(method.settings, {"prompt": "hat"}, paper, method.config_blocks, method.fixed)[0].negative_guidance == 1.0
    flagged, sources = resolve(method.settings, {"prompt": "hat", "erase_from": "cowboy", "negative_guidance": 1.0},
                               paper, method.config_blocks, method.fixed)
    assert flagged.negative_guidance == 1.0 and sources["negative_guidance"] == "flag"
    tiny, sources = resolve(method.settings, {"prompt": "heart", "erase_from": "red"}, load_config(TINY / "config.yaml"),
                            method.config_blocks, method.fixed)
    assert sources["negative_guidance"] == "model config esd_defaults"


def test_x_t_authors_samples_one_target_per_trajectory():
    method = methods.get("esd-x")
    with pytest.raises(UsageError, match="--x_t authors"):
        resolve(method.settings, {"prompt": "moon", "x_t": "authors", "sample_from": "base",
                                  "targets_per_trajectory": 4}, OmegaConf.create({}), method.config_blocks, method.fixed)
