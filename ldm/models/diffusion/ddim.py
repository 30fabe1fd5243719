"""DDIM sampling (Song et al. 2021) as small pure functions, plus CompVis' ``DDIMSampler`` interface.

Timesteps and schedule match CompVis (and diffusers' ``DDIMScheduler`` with ``steps_offset=1``,
``set_alpha_to_one=False``): for S steps over 1000, ``t = 1, 1 + 1000//S, ...``; the last step's
previous alpha is ``alphas_cumprod[0]``.
"""
import numpy as np
import torch
from tqdm.auto import tqdm


def make_ddim_timesteps(num_ddim_timesteps, num_ddpm_timesteps=1000, discretize="uniform"):
    """DDPM timesteps visited by a DDIM sampler of ``num_ddim_timesteps`` steps, ascending."""
    if not 0 < num_ddim_timesteps <= num_ddpm_timesteps:
        raise ValueError(f"ddim steps must be in 1..{num_ddpm_timesteps}, got {num_ddim_timesteps}")
    if discretize == "uniform":
        # CompVis' range(0, T, T // S) gives S + 1 steps when S does not divide T; this is diffusers'
        # "leading" spacing, identical whenever S divides T.
        steps = np.arange(num_ddim_timesteps) * (num_ddpm_timesteps // num_ddim_timesteps)
    elif discretize == "quad":
        steps = (np.linspace(0, np.sqrt(num_ddpm_timesteps * 0.8), num_ddim_timesteps) ** 2).astype(int)
    else:
        raise ValueError(f"ddim discretization '{discretize}' unknown; use 'uniform' or 'quad'")
    return steps + 1


def make_ddim_sampling_parameters(alphas_cumprod, ddim_timesteps, eta):
    """Per-step ``(alpha_t, alpha_prev, sigma_t)`` tensors for DDIM with stochasticity ``eta``."""
    alphas = alphas_cumprod[ddim_timesteps]
    alphas_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[ddim_timesteps[:-1]]])
    sigmas = eta * torch.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    return alphas, alphas_prev, sigmas


def cfg_denoise(model, x, t, cond, uncond=None, guidance_scale=1.0):
    """Classifier-free guided noise prediction; unconditional and conditional in one batched forward."""
    if uncond is None or guidance_scale == 1.0:
        return model.apply_model(x, t, cond)
    e_uncond, e_cond = model.apply_model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond])).chunk(2)
    return e_uncond + guidance_scale * (e_cond - e_uncond)


def ddim_step(x, eps, alpha_t, alpha_prev, sigma_t, noise=None):
    """One DDIM update from ``x_t`` to ``x_prev``; returns ``(x_prev, predicted x0)``."""
    pred_x0 = (x - (1 - alpha_t).sqrt() * eps) / alpha_t.sqrt()
    x_prev = alpha_prev.sqrt() * pred_x0 + (1 - alpha_prev - sigma_t**2).sqrt() * eps
    if sigma_t > 0:
        x_prev = x_prev + sigma_t * (torch.randn_like(x) if noise is None else noise)
    return x_prev, pred_x0


def ddim_sample(model, x_T, cond, uncond=None, guidance_scale=1.0, num_steps=50, eta=0.0, till_T=None,
                log_every_t=None, progress=False, callback=None):
    """Sample from ``x_T`` with ``num_steps`` DDIM steps; with ``till_T=k`` stop after k steps.

    Returns ``(x, intermediates)`` where intermediates holds the ``x_inter`` and ``pred_x0`` lists logged
    every ``log_every_t`` steps (and the last one) when ``log_every_t`` is set. ``callback(i)`` runs
    after step i, as in CompVis.
    """
    timesteps = make_ddim_timesteps(num_steps, model.num_timesteps)
    alphas, alphas_prev, sigmas = make_ddim_sampling_parameters(
        model.alphas_cumprod.to(torch.float64), torch.as_tensor(timesteps, device=model.alphas_cumprod.device), eta)
    total = num_steps if till_T is None else int(till_T)
    if not 0 <= total <= num_steps:
        raise ValueError(f"till_T must be in 0..{num_steps}, got {till_T}")
    x = x_T
    intermediates = {"x_inter": [x_T], "pred_x0": [x_T]}
    for i in tqdm(range(total), desc="DDIM", disable=not progress):
        index = num_steps - 1 - i
        t = torch.full((x.shape[0],), int(timesteps[index]), device=x.device, dtype=torch.long)
        eps = cfg_denoise(model, x, t, cond, uncond, guidance_scale)
        x, pred_x0 = ddim_step(x, eps, *(v[index].to(x.dtype) for v in (alphas, alphas_prev, sigmas)))
        if log_every_t and (index % log_every_t == 0 or i == total - 1):
            intermediates["x_inter"].append(x)
            intermediates["pred_x0"].append(pred_x0)
        if callback is not None:
            callback(i)
    return x, intermediates


class DDIMSampler:
    """CompVis' sampler interface over :func:`ddim_sample`, for scripts written against CompVis."""

    def __init__(self, model, schedule="linear", **kwargs):
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule

    def make_schedule(self, ddim_num_steps, ddim_discretize="uniform", ddim_eta=0.0, verbose=True):
        """Set ``ddim_timesteps`` and the per-step alphas and sigmas, as CompVis' attributes."""
        self.ddim_timesteps = make_ddim_timesteps(ddim_num_steps, self.ddpm_num_timesteps, ddim_discretize)
        self.ddim_alphas, self.ddim_alphas_prev, self.ddim_sigmas = make_ddim_sampling_parameters(
            self.model.alphas_cumprod, torch.as_tensor(self.ddim_timesteps, device=self.model.alphas_cumprod.device),
            ddim_eta)

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, eta=0.0, x_T=None,
               log_every_t=100, unconditional_guidance_scale=1.0, unconditional_conditioning=None,
               verbose=True, till_T=None, generator=None, **unsupported):
        """Sample ``batch_size`` latents of ``shape`` (C, H, W); returns ``(samples, intermediates)``.

        ``till_T=k`` stops after k of the S steps and returns that ``x_t`` (ESD's partial sampling).
        """
        used = {k for k, v in unsupported.items()
                if v is not None and not (isinstance(v, (bool, int, float)) and v in (0.0, 1.0))}
        if used:
            raise ValueError(f"DDIMSampler.sample: options not supported: {', '.join(sorted(used))}")
        self.make_schedule(S, ddim_eta=eta, verbose=verbose)
        device = self.model.betas.device
        if x_T is None:
            x_T = torch.randn((batch_size, *shape), generator=generator, device=device)
        return ddim_sample(self.model, x_T, conditioning, unconditional_conditioning, unconditional_guidance_scale,
                           num_steps=S, eta=eta, till_T=till_T, log_every_t=log_every_t, progress=verbose,
                           callback=callback)
