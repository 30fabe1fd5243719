"""SD v1 at full size, on the meta device: our config's state dict fits diffusers' SD v1.4 models exactly."""
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

from ldm.util import count_params, instantiate_from_config, load_config

from conftest import SD_CONFIG

# diffusers' configs of CompVis/stable-diffusion-v1-4 (unet/config.json, vae/config.json)
SD14_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    cross_attention_dim=768, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5,
    norm_num_groups=32, out_channels=4, sample_size=64, up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)
SD14_VAE = dict(
    act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    in_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=512,
    up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.18215,
)


def test_v1_inference_config_fits_diffusers_sd14():
    with torch.device("meta"):
        model = instantiate_from_config(load_config(SD_CONFIG).model)
        unet, vae = UNet2DConditionModel(**SD14_UNET), AutoencoderKL(**SD14_VAE)
    assert count_params(model.model.diffusion_model) == 859_520_964  # SD v1's 859.52M
    assert count_params(model.first_stage_model) == 83_653_863
    assert count_params(model.cond_stage_model) == 123_060_480  # CLIP ViT-L/14 text transformer
    state_dict = model.state_dict()
    unet.load_state_dict(convert_ldm_unet_checkpoint(state_dict, SD14_UNET), strict=True, assign=True)
    vae.load_state_dict(convert_ldm_vae_checkpoint(state_dict, SD14_VAE), strict=True, assign=True)
    assert count_params(unet) == 859_520_964 and count_params(vae) == 83_653_863
    # the names later methods rely on
    names = dict(model.model.diffusion_model.named_parameters())
    assert "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight" in names
    assert names["output_blocks.6.1.transformer_blocks.0.attn2.to_v.weight"].shape == (640, 768)
    assert sum("attn2.to_k" in n for n in names) == 16  # SD v1's 16 cross-attention layers
