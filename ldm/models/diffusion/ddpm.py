"""DDPM and latent diffusion (CompVis ``LatentDiffusion``): the schedule buffers, noising, the
denoiser call with text conditioning, and a Lightning ``training_step`` to train from scratch.

Buffer and module names match CompVis SD v1 checkpoints (``betas``, ``alphas_cumprod``, ...,
``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``).
"""
from contextlib import contextmanager
from functools import partial

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR

from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.util import (IGNORED_CHECKPOINT_KEYS, UsageError, instantiate_from_config, load_checkpoint_file, load_state_dict_strict,
                      state_dict_from_checkpoint)


def disabled_train(self, mode=True):
    """Replacement for ``nn.Module.train`` that keeps frozen sub-models in eval mode."""
    return self


class DiffusionWrapper(nn.Module):
    """Holds the denoiser as ``diffusion_model`` and routes the conditioning to it."""

    KEYS = (None, "concat", "crossattn", "hybrid", "adm")

    def __init__(self, diff_model_config, conditioning_key):
        super().__init__()
        if conditioning_key not in self.KEYS:
            raise UsageError(f"conditioning_key '{conditioning_key}' unknown; use one of {self.KEYS}")
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key

    def forward(self, x, t, c_concat=None, c_crossattn=None):
        key = self.conditioning_key
        if key is None:
            return self.diffusion_model(x, t)
        if key == "concat":
            return self.diffusion_model(torch.cat([x, *c_concat], dim=1), t)
        if key == "crossattn":
            return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))
        if key == "hybrid":
            return self.diffusion_model(torch.cat([x, *c_concat], dim=1), t, context=torch.cat(c_crossattn, 1))
        return self.diffusion_model(x, t, y=c_crossattn[0])


class DDPM(pl.LightningModule):
    """Gaussian diffusion in data space with an eps- or x0-predicting denoiser."""

    def __init__(self, unet_config, timesteps=1000, beta_schedule="linear", loss_type="l2", ckpt_path=None,
                 ignore_keys=(), load_only_unet=False, monitor="val/loss", use_ema=True, first_stage_key="image",
                 image_size=256, channels=3, log_every_t=100, clip_denoised=True, linear_start=1e-4,
                 linear_end=2e-2, cosine_s=8e-3, given_betas=None, original_elbo_weight=0.0, v_posterior=0.0,
                 l_simple_weight=1.0, conditioning_key=None, parameterization="eps", scheduler_config=None,
                 use_positional_encodings=False, learn_logvar=False, logvar_init=0.0, min_snr_gamma=None,
                 truncated_snr=False):
        super().__init__()
        if parameterization not in ("eps", "x0"):
            raise UsageError(f"parameterization '{parameterization}' unsupported; use 'eps' or 'x0'")
        if loss_type not in ("l1", "l2"):
            raise UsageError(f"loss_type '{loss_type}' unknown; use 'l1' or 'l2'")
        self.parameterization = parameterization
        self.cond_stage_model = None
        self.clip_denoised = clip_denoised
        self.log_every_t = log_every_t
        self.first_stage_key = first_stage_key
        self.image_size = image_size
        self.channels = channels
        self.use_positional_encodings = use_positional_encodings
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self.model)
        self.use_scheduler = scheduler_config is not None
        self.scheduler_config = scheduler_config
        self.v_posterior = v_posterior
        self.original_elbo_weight = original_elbo_weight
        self.l_simple_weight = l_simple_weight
        self.min_snr_gamma = min_snr_gamma
        self.truncated_snr = truncated_snr
        self.monitor = monitor
        self.loss_type = loss_type
        self.register_schedule(given_betas, beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        self.learn_logvar = learn_logvar
        self.logvar = torch.full((self.num_timesteps,), fill_value=logvar_init)
        if learn_logvar:
            self.logvar = nn.Parameter(self.logvar, requires_grad=True)
        self._init_ckpt = (ckpt_path, tuple(ignore_keys), load_only_unet)

    def register_schedule(self, given_betas=None, beta_schedule="linear", timesteps=1000, linear_start=1e-4,
                          linear_end=2e-2, cosine_s=8e-3):
        """Compute the schedule in float64 and register it as float32 buffers, as CompVis does."""
        betas = given_betas if given_betas is not None else make_beta_schedule(
            beta_schedule, timesteps, linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s)
        betas = np.asarray(betas, dtype=np.float64)
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas, axis=0)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        self.num_timesteps = int(betas.shape[0])
        self.linear_start, self.linear_end = linear_start, linear_end
        to_torch = partial(torch.tensor, dtype=torch.float32)
        self.register_buffer("betas", to_torch(betas))
        self.register_buffer("alphas_cumprod", to_torch(alphas_cumprod))
        self.register_buffer("alphas_cumprod_prev", to_torch(alphas_cumprod_prev))
        self.register_buffer("sqrt_alphas_cumprod", to_torch(np.sqrt(alphas_cumprod)))
        self.register_buffer("sqrt_one_minus_alphas_cumprod", to_torch(np.sqrt(1.0 - alphas_cumprod)))
        self.register_buffer("log_one_minus_alphas_cumprod", to_torch(np.log(1.0 - alphas_cumprod)))
        self.register_buffer("sqrt_recip_alphas_cumprod", to_torch(np.sqrt(1.0 / alphas_cumprod)))
        self.register_buffer("sqrt_recipm1_alphas_cumprod", to_torch(np.sqrt(1.0 / alphas_cumprod - 1)))
        posterior_variance = ((1 - self.v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
                              + self.v_posterior * betas)
        self.register_buffer("posterior_variance", to_torch(posterior_variance))
        self.register_buffer("posterior_log_variance_clipped", to_torch(np.log(np.maximum(posterior_variance, 1e-20))))
        self.register_buffer("posterior_mean_coef1", to_torch(betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)))
        self.register_buffer("posterior_mean_coef2", to_torch((1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod)))
        if self.parameterization == "eps":
            lvlb_weights = betas**2 / (2 * np.maximum(posterior_variance, 1e-20) * alphas * (1 - alphas_cumprod))
        else:
            lvlb_weights = 0.5 * np.sqrt(alphas_cumprod) / (2.0 * 1 - alphas_cumprod)
        lvlb_weights[0] = lvlb_weights[1]
        self.register_buffer("lvlb_weights", to_torch(lvlb_weights), persistent=False)

    def init_from_ckpt(self, path, ignore_keys=(), only_model=False):
        """Load ``path`` strictly; ``ignore_keys`` are key prefixes skipped on purpose."""
        state_dict = state_dict_from_checkpoint(load_checkpoint_file(path))
        target = self.model if only_model else self
        if only_model:
            state_dict = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
        load_state_dict_strict(target, state_dict, ignored=(*IGNORED_CHECKPOINT_KEYS, *(f"{k}*" for k in ignore_keys)),
                               source=f"checkpoint '{path}'")

    def ema_pairs(self):
        """(EMA, module) pairs this model keeps: the denoiser's, and a trained text encoder's."""
        if not self.use_ema:
            return []
        pairs = [(self.model_ema, self.model)]
        if getattr(self, "cond_stage_model_ema", None) is not None:
            pairs.append((self.cond_stage_model_ema, self.cond_stage_model))
        return pairs

    @contextmanager
    def ema_scope(self, context=None):
        """Temporarily swap in the EMA weights (no-op without EMA)."""
        for ema, module in self.ema_pairs():
            ema.store(module.parameters())
            ema.copy_to(module)
        try:
            yield None
        finally:
            for ema, module in self.ema_pairs():
                ema.restore(module.parameters())

    def q_sample(self, x_start, t, noise=None):
        """Noise ``x_start`` to timestep ``t``: ``sqrt(a_t) x0 + sqrt(1 - a_t) noise``."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def predict_start_from_noise(self, x_t, t, noise):
        """x0 implied by ``x_t`` and a noise prediction."""
        return (extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise)

    def get_loss(self, pred, target, mean=True):
        """Elementwise l1/l2 between prediction and target (mean or unreduced)."""
        if self.loss_type == "l1":
            loss = (target - pred).abs()
            return loss.mean() if mean else loss
        return torch.nn.functional.mse_loss(target, pred, reduction="mean" if mean else "none")

    def on_train_batch_end(self, *args, **kwargs):
        for ema, module in self.ema_pairs():
            ema(module)


class LatentDiffusion(DDPM):
    """Diffusion in the latent space of ``first_stage_config`` conditioned by ``cond_stage_config``."""

    def __init__(self, first_stage_config, cond_stage_config, num_timesteps_cond=None, cond_stage_key="image",
                 cond_stage_trainable=False, concat_mode=True, cond_stage_forward=None, conditioning_key=None,
                 scale_factor=1.0, scale_by_std=False, *args, **kwargs):
        self.num_timesteps_cond = num_timesteps_cond or 1
        if self.num_timesteps_cond != 1:
            raise UsageError("num_timesteps_cond > 1 (noised conditioning) is not supported")
        if conditioning_key is None:
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == "__is_unconditional__":
            conditioning_key = None
        super().__init__(*args, conditioning_key=conditioning_key, **kwargs)
        self.concat_mode = concat_mode
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_key = cond_stage_key
        self.num_downs = len(first_stage_config.params.ddconfig.ch_mult) - 1
        self.scale_by_std = scale_by_std
        if scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(scale_factor))
        else:
            self.scale_factor = scale_factor
        self.first_stage_model = instantiate_from_config(first_stage_config).eval()
        self.first_stage_model.train = disabled_train
        for param in self.first_stage_model.parameters():
            param.requires_grad = False
        self.cond_stage_model = instantiate_from_config(cond_stage_config)
        if self.cond_stage_model is not None and not cond_stage_trainable:
            self.cond_stage_model = self.cond_stage_model.eval()
            self.cond_stage_model.train = disabled_train
            for param in self.cond_stage_model.parameters():
                param.requires_grad = False
        # A text encoder trained with the model (CompVis' cond_stage_trainable) gets its own EMA, so the
        # exported encoder matches the exported (EMA) denoiser.
        if self.use_ema and cond_stage_trainable and self.cond_stage_model is not None:
            self.cond_stage_model_ema = LitEma(self.cond_stage_model)
        self.cond_stage_forward = cond_stage_forward
        self.clip_denoised = False
        ckpt_path, ignore_keys, only_unet = self._init_ckpt
        self.restarted_from_ckpt = ckpt_path is not None
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys, only_model=only_unet)

    def get_learned_conditioning(self, c):
        """Text prompts (list of str) to the cross-attention context (B, tokens, dim)."""
        if self.cond_stage_forward is not None:
            return getattr(self.cond_stage_model, self.cond_stage_forward)(c)
        if hasattr(self.cond_stage_model, "encode") and callable(self.cond_stage_model.encode):
            c = self.cond_stage_model.encode(c)
            return c.mode() if isinstance(c, DiagonalGaussianDistribution) else c
        return self.cond_stage_model(c)

    @torch.no_grad()
    def encode_first_stage(self, x):
        """Images in [-1, 1] to the first stage's posterior."""
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior):
        """Posterior (sampled) or tensor, times ``scale_factor``: the latent the UNet sees."""
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample()
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise TypeError(f"encoder_posterior of type '{type(encoder_posterior)}' not supported")
        return self.scale_factor * z

    def decode_first_stage(self, z):
        """UNet latent to images in about [-1, 1]."""
        return self.first_stage_model.decode(z / self.scale_factor)

    def apply_model(self, x_noisy, t, cond, return_ids=False):
        """The denoiser's prediction for ``x_noisy`` at ``t`` given the learned conditioning ``cond``."""
        if not isinstance(cond, dict):
            if not isinstance(cond, list):
                cond = [cond]
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond}
        return self.model(x_noisy, t, **cond)

    def get_input(self, batch, k):
        """Latents and raw conditioning from a batch whose images are channels-last in [-1, 1].

        A batch may instead carry ``first_stage_moments`` (the frozen encoder's output for its images,
        computed once for a fixed data set); the latent is then sampled from them, skipping the encoder.
        """
        if "first_stage_moments" in batch:
            posterior = DiagonalGaussianDistribution(batch["first_stage_moments"].float())
        else:
            x = batch[k]
            if x.dim() == 3:
                x = x[..., None]
            posterior = self.encode_first_stage(x.permute(0, 3, 1, 2).contiguous().float())
        z = self.get_first_stage_encoding(posterior).detach()
        c = batch[self.cond_stage_key] if self.model.conditioning_key is not None else None
        return z, c

    def forward(self, x, c):
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=self.device).long()
        if self.model.conditioning_key is not None:
            c = self.get_learned_conditioning(c)
        return self.p_losses(x, c, t)

    def p_losses(self, x_start, cond, t, noise=None):
        """CompVis' training loss: simple loss (per-timestep log-variance weighted) plus ELBO term."""
        noise = torch.randn_like(x_start) if noise is None else noise
        model_output = self.apply_model(self.q_sample(x_start, t, noise), t, cond)
        target = noise if self.parameterization == "eps" else x_start
        prefix = "train" if self.training else "val"
        loss_simple = self.get_loss(model_output, target, mean=False).mean(dim=(1, 2, 3))
        logvar_t = self.logvar.to(self.device)[t]
        loss_weighted = loss_simple * self.snr_loss_weight(t)
        loss = (loss_weighted / torch.exp(logvar_t) + logvar_t).mean() * self.l_simple_weight
        loss_vlb = (self.lvlb_weights[t] * loss_simple).mean()
        loss = loss + self.original_elbo_weight * loss_vlb
        return loss, {f"{prefix}/loss_simple": loss_simple.mean(), f"{prefix}/loss_vlb": loss_vlb,
                      f"{prefix}/loss": loss}

    def snr_loss_weight(self, t):
        """Per-sample weight of the simple loss at timesteps ``t`` (1 unless a weighting is configured).

        ``min_snr_gamma`` (Hang et al. 2023) caps the weight of the easy low-noise steps: x0-loss times
        min(SNR, gamma). ``truncated_snr`` (Salimans & Ho 2022) lifts the high-noise steps to at least the
        x0-loss: x0-loss times max(SNR, 1). For an eps-model, whose eps-loss is SNR times its x0-loss, the
        high-noise steps that decide layout and color otherwise weigh almost nothing. Together: x0-loss
        times SNR clamped to [1, gamma]. Returned as the factor on the model's own (eps or x0) loss.
        """
        alphas_cumprod = self.alphas_cumprod[t]
        snr = alphas_cumprod / (1 - alphas_cumprod)
        x0_weight = snr
        if self.min_snr_gamma:
            x0_weight = x0_weight.clamp(max=self.min_snr_gamma)
        if self.truncated_snr:
            x0_weight = x0_weight.clamp(min=1.0)
        return x0_weight / snr if self.parameterization == "eps" else x0_weight

    @torch.no_grad()
    def on_train_batch_start(self, batch, batch_idx):
        # CompVis' scale_by_std: set scale_factor = 1 / std of the first batch's latents, once.
        if self.scale_by_std and self.global_step == 0 and batch_idx == 0 and not self.restarted_from_ckpt:
            self.scale_factor = torch.ones_like(torch.as_tensor(self.scale_factor))
            z, _ = self.get_input(batch, self.first_stage_key)
            self.scale_factor = 1.0 / z.flatten().std()

    def training_step(self, batch, batch_idx):
        loss, loss_dict = self(*self.get_input(batch, self.first_stage_key))
        self.log_dict(loss_dict, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(batch[self.first_stage_key]))
        return loss

    @torch.no_grad()
    def validation_step(self, batch, batch_idx):
        with self.ema_scope():
            _, loss_dict = self(*self.get_input(batch, self.first_stage_key))
        self.log_dict(loss_dict, on_epoch=True, batch_size=len(batch[self.first_stage_key]))

    def trainable_parameters(self):
        """What the optimizer trains: the denoiser, a trainable text encoder's free parameters, logvar."""
        params = list(self.model.parameters())
        if self.cond_stage_trainable:
            params += [p for p in self.cond_stage_model.parameters() if p.requires_grad]
        if self.learn_logvar:
            params.append(self.logvar)
        return params

    def configure_optimizers(self):
        lr = getattr(self, "learning_rate", 1e-4)
        optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=lr)
        if not self.use_scheduler:
            return optimizer
        scheduler = LambdaLR(optimizer, lr_lambda=instantiate_from_config(self.scheduler_config))
        return [optimizer], [{"scheduler": scheduler, "interval": "step", "frequency": 1}]
