"""Our ldm against diffusers and transformers holding the same (converted) weights."""
import pytest
import torch
from transformers import CLIPTokenizer

from ldm.convert import convert_text_encoder, convert_unet, convert_vae, to_diffusers_pipeline
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.paths import CLIP_TOKENIZER_DIR


@pytest.fixture(scope="module")
def state_dict(small_model):
    return small_model.state_dict()


@pytest.mark.parametrize("context", ["text", "unconditional"])
def test_unet_matches_diffusers(small_model, small_config, state_dict, context):
    unet = convert_unet(state_dict, small_config).eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=generator)
    if context == "text":
        cond = torch.randn(3, 77, 64, generator=generator)
    else:
        cond = small_model.get_learned_conditioning([""] * 3)
    with torch.no_grad():
        for t in ([1, 1, 1], [999, 999, 999], [10, 500, 981]):
            t = torch.tensor(t)
            ours = small_model.apply_model(x, t, cond)
            theirs = unet(x, t, encoder_hidden_states=cond).sample
            assert ours.abs().max() > 1e-2  # random weights: a real, non-trivial output
            assert (ours - theirs).abs().max() <= 1e-4


def test_autoencoder_matches_diffusers(small_model, small_config, state_dict):
    vae = convert_vae(state_dict, small_config).eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    with torch.no_grad():
        ours_mean = small_model.encode_first_stage(images).mean
        theirs_mean = vae.encode(images).latent_dist.mean
        assert (ours_mean - theirs_mean).abs().max() <= 1e-4
        ours_img = small_model.first_stage_model.decode(latents)
        theirs_img = vae.decode(latents).sample
        assert (ours_img - theirs_img).abs().max() <= 1e-4


def test_text_encoder_matches_transformers(small_model, state_dict):
    text_encoder = convert_text_encoder(state_dict, small_model.cond_stage_model.transformer.config).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR), local_files_only=True)
    prompts = ["a photo of a cat", "", "a blue hexagon in the style of Van Gogh, " * 20]  # last one truncates
    tokens = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        ours = small_model.get_learned_conditioning(prompts)
        theirs = text_encoder(tokens).last_hidden_state
    assert ours.shape == (3, 77, 64)
    assert (ours - theirs).abs().max() <= 1e-5


def test_tokenizer_is_real_clip_bpe(small_model):
    ids = small_model.cond_stage_model.tokenize(["a photo of a cat"])[0]
    assert ids[:7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids.shape == (77,) and (ids[7:] == 49407).all()


def test_ddim_sampling_matches_diffusers_pipeline(small_model, small_config):
    pipe = to_diffusers_pipeline(small_model, small_config)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red star", "a painting by Seurat"]
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cond = small_model.get_learned_conditioning(prompts)
        uncond = small_model.get_learned_conditioning([""] * 2)
        ours, _ = DDIMSampler(small_model).sample(S=20, batch_size=2, shape=(4, 8, 8), conditioning=cond, x_T=x_T,
                                                  unconditional_guidance_scale=7.5, unconditional_conditioning=uncond,
                                                  eta=0.0, verbose=False)
        theirs = pipe(prompts, height=64, width=64, num_inference_steps=20, guidance_scale=7.5, latents=x_T.clone(),
                      output_type="latent").images
    assert (ours - x_T).abs().max() > 0.1
    assert (ours - theirs).abs().max() <= 1e-3
