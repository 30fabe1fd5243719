"""CompVis checkpoints to diffusers models, through diffusers' own single-file converters, and edited
models to single CompVis-format files (what AUTOMATIC1111, ComfyUI and diffusers' ``from_single_file`` load)."""
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ldm.modules.encoders.modules import FrozenCLIPEmbedder
from ldm.util import UsageError, atomic_save, atomic_save_safetensors


def _original_config(config):
    return OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else config


def pixel_size(config):
    """Image side in pixels implied by a CompVis config (latent size times the VAE's downsampling)."""
    params = _original_config(config)["model"]["params"]
    return params["image_size"] * 2 ** (len(params["first_stage_config"]["params"]["ddconfig"]["ch_mult"]) - 1)


def _convert(model_class, make_config, convert, state_dict, config, complete_config=None):
    """Build a diffusers model from its config-maker and weight converter, loading it strictly."""
    original = _original_config(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # image_size is deprecated there but still needed
        model_config = make_config(original, state_dict, image_size=pixel_size(original))
    if complete_config is not None:
        complete_config(model_config, original)
    weights = convert(state_dict, model_config)
    with torch.device("meta"):
        model = model_class(**model_config)
    model.load_state_dict(weights, strict=True, assign=True)
    return model


def convert_unet(state_dict, config):
    """A diffusers ``UNet2DConditionModel`` holding the CompVis UNet weights of ``state_dict``."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
    return _convert(UNet2DConditionModel, create_unet_diffusers_config_from_ldm, convert_ldm_unet_checkpoint,
                    state_dict, config, _heads_from_head_channels)


def _heads_from_head_channels(unet_config, original):
    """diffusers derives the head count from ``num_head_channels`` only for SD 2 (linear projections);
    a CompVis UNet with ``num_head_channels`` and conv projections (tiny-sd) needs it per level."""
    params = original["model"]["params"]["unet_config"]["params"]
    if unet_config.get("attention_head_dim") is None and params.get("num_head_channels", -1) > 0:
        unet_config["attention_head_dim"] = [params["model_channels"] * mult // params["num_head_channels"]
                                             for mult in params["channel_mult"]]


def convert_vae(state_dict, config):
    """A diffusers ``AutoencoderKL`` holding the CompVis first stage of ``state_dict``."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm
    return _convert(AutoencoderKL, create_vae_diffusers_config_from_ldm, convert_ldm_vae_checkpoint, state_dict, config)


def convert_text_encoder(state_dict, text_config):
    """A transformers ``CLIPTextModel`` holding ``cond_stage_model.transformer.*`` of ``state_dict``."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextModel
    text_encoder = CLIPTextModel(text_config)
    weights = convert_ldm_clip_checkpoint(state_dict)
    if not hasattr(text_encoder, "text_model"):  # transformers >= 5 has no `text_model.` level
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    missing, unexpected = text_encoder.load_state_dict(weights, strict=False)
    stray = [k for k in (*missing, *unexpected) if not k.endswith("position_ids")]
    if stray:
        raise UsageError(f"text encoder weights do not match its config: {stray[:3]}")
    return text_encoder


def ddim_scheduler(config):
    """The diffusers ``DDIMScheduler`` matching the config's DDPM schedule and this project's sampler."""
    from diffusers import DDIMScheduler
    params = _original_config(config)["model"]["params"]
    if params.get("beta_schedule", "linear") != "linear":
        raise UsageError("only the 'linear' (scaled_linear in diffusers) beta schedule converts to diffusers")
    return DDIMScheduler(num_train_timesteps=params.get("timesteps", 1000), beta_start=params["linear_start"],
                         beta_end=params["linear_end"], beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def to_diffusers_pipeline(model, config):
    """A ``StableDiffusionPipeline`` (no safety checker) with ``model``'s weights."""
    from diffusers import StableDiffusionPipeline
    if not isinstance(model.cond_stage_model, FrozenCLIPEmbedder):
        raise UsageError("only models with a FrozenCLIPEmbedder text encoder convert to a StableDiffusionPipeline")
    state_dict = model.state_dict()
    return StableDiffusionPipeline(
        vae=convert_vae(state_dict, config), text_encoder=convert_text_encoder(
            state_dict, model.cond_stage_model.transformer.config),
        tokenizer=model.cond_stage_model.tokenizer, unet=convert_unet(state_dict, config),
        scheduler=ddim_scheduler(config), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_diffusers(model, config, out_dir, unet_only=False, overwrite=False):
    """Write ``model`` as a diffusers pipeline folder (or its UNet alone) atomically to ``out_dir``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise UsageError(f"'{out_dir}' already exists; pass --overwrite to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        if unet_only:
            convert_unet(model.state_dict(), config).save_pretrained(tmp)
        else:
            to_diffusers_pipeline(model, config).save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


SINGLE_FILE_FORMATS = ("safetensors", "ckpt")


def save_single_file(loaded, path, half=True, overwrite=False):
    """Write a loaded model (a CompVis model or a run, its edit folded into the weights) as one CompVis-format
    file, atomically: ``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*``,
    fp16 parameters by default. A CPE run is refused: its gates depend on the prompt and fold into no weight."""
    path = Path(path)
    if path.suffix[1:] not in SINGLE_FILE_FORMATS:
        raise UsageError(f"'{path}': a single-file checkpoint ends in .safetensors or .ckpt")
    if loaded.method is not None and not loaded.method.foldable:
        raise UsageError(f"'{loaded.name}' is a {loaded.method.name} run: its edit depends on the prompt and cannot be "
                         "folded into static weights; apply it to a diffusers pipeline with its registry entry's "
                         "apply_to_diffusers")
    if loaded.kind == "diffusers":
        raise UsageError(f"'{loaded.name}' is a diffusers folder; export a CompVis model or a run")
    if path.exists() and not overwrite:
        raise UsageError(f"'{path}' already exists; pass --overwrite to replace it")
    metadata = {"format": "pt", "source": loaded.name, "identity_sha256": loaded.sha256,
                "dtype": "float16" if half else "float32"}
    return export_checkpoint(loaded.model, path, half=half, metadata=metadata)


def compvis_state_dict(model, half=True, drop=("model_ema.", "cond_stage_model_ema.", "text_heads.")):
    """``model``'s state dict as a CompVis checkpoint holds it (``model.diffusion_model.*``,
    ``first_stage_model.*``, ``cond_stage_model.transformer.*`` and the schedule buffers), contiguous on the CPU.

    EMA weights, when the model keeps them, replace ``model.*`` (as in SD v1's released checkpoints).
    With ``half``, parameters are stored as fp16; buffers (the noise schedule) stay fp32.
    """
    for ema, module in model.ema_pairs() if hasattr(model, "ema_pairs") else []:
        ema.copy_to(module)
    buffers = {name for name, _ in model.named_buffers()}
    state_dict = {}
    for name, value in model.state_dict().items():
        if name.startswith(drop):  # EMA copies (copied in above) and training-only heads
            continue
        if half and name not in buffers and value.is_floating_point():
            value = value.half()
        state_dict[name] = value.detach().cpu().contiguous()
    return state_dict


def export_checkpoint(model, path, half=True, metadata=None):
    """Write ``model`` as one CompVis checkpoint file, atomically: ``.safetensors`` (the tensors, with
    ``metadata`` as strings) or ``.ckpt`` (``{"state_dict": ...}``, loadable with ``weights_only=True``)."""
    state_dict = compvis_state_dict(model, half)
    if Path(path).suffix == ".safetensors":
        return atomic_save_safetensors(state_dict, path, metadata)
    return atomic_save({"state_dict": state_dict}, path)
