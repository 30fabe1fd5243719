"""UnlearnDiffAtk (Zhang et al., 2024; docs/attacks.md): the erased model's own
denoising loss turned against it.

For a target image of the concept (its latent ``z0``, drawn by the base model from the concept's prompt),
``k`` adversarial prefix tokens are optimised so that the erased model, conditioned on ``prefix + prompt``,
denoises ``z0`` well:

    min_prefix  E_{t, eps} || eps_erased(q_sample(z0, t, eps), t, E(prefix + prompt)) - eps ||^2

by projected gradient steps on the prefix's token embeddings: the forward pass uses each prefix row's
nearest real vocabulary token (the discrete prompt a user could type), the gradient updates the continuous
rows (straight-through), so the result is always a text prompt. The erased model is frozen; only the
prefix moves.
"""
import contextlib
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ldm.attacks.ringabell import frame_token_ids
from ldm.util import UsageError


@dataclass
class UnlearnDiffAtkSettings:
    """The attack's settings (recorded with every attack)."""
    prefix_tokens: int = 5   # k, the paper's default
    steps: int = 40          # projected gradient steps, the paper's default
    lr: float = 1e-2         # Adam on the prefix's token embeddings
    seed: int = 0

    def check(self):
        """Refuse settings the attack cannot run with, one line each."""
        if self.prefix_tokens < 1 or self.steps < 1:
            raise UsageError("UnlearnDiffAtk: --prefix_tokens and --steps must be >= 1")
        if not self.lr > 0:
            raise UsageError(f"UnlearnDiffAtk: --attack_lr must be positive, got {self.lr}")
        return self

    def as_dict(self):
        return asdict(self)


@contextlib.contextmanager
def replaced_token_embeddings(text_encoder, positions, rows):
    """Within the block, the text encoder's token-embedding output at ``positions`` (a slice of the
    context) is ``rows`` (k, width), gradients flowing into ``rows``."""
    def replace(module, inputs, output):
        output = output.clone()
        output[:, positions] = rows.to(output.dtype).unsqueeze(0).expand(output.shape[0], -1, -1)
        return output

    handle = text_encoder.transformer.get_input_embeddings().register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def prefixed_ids(text_encoder, prompt, k, placeholder):
    """Token ids (1, context) of ``placeholder`` x k followed by ``prompt``, framed as a prompt
    (``frame_token_ids``; the prompt's tail is cut where the context ends). The prefix sits at positions 1..k."""
    context = text_encoder.max_length
    if k + 2 > context:
        raise UsageError(f"UnlearnDiffAtk: {k} prefix tokens do not fit a {context}-token context")
    words = text_encoder.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return frame_token_ids(text_encoder.tokenizer, torch.tensor([[placeholder] * k + words]), context)


def nearest_tokens(rows, vocabulary, candidates, directions):
    """For each row, the vocabulary token whose embedding is nearest by cosine: (ids, their rows).
    ``candidates`` are the vocabulary's embedding rows, ``directions`` their unit vectors (computed once
    per attack, not per step)."""
    index = (F.normalize(rows, dim=-1) @ directions.T).argmax(-1)
    return vocabulary[index.cpu()], candidates[index]


def attack_prompt(model, prompt, z0, vocabulary, settings):
    """The adversarial prompt for ``prompt`` against ``model`` (a CompVis LatentDiffusion, the erased one)
    on target latents ``z0`` (n, C, H, W): ``settings.prefix_tokens`` vocabulary tokens put before the prompt.
    Returns the text and a record (the prefix ids and the loss of every step)."""
    settings.check()
    encoder = model.cond_stage_model
    device = model.betas.device
    generator = torch.Generator().manual_seed(settings.seed)
    table = encoder.transformer.get_input_embeddings().weight.detach()
    start = vocabulary[torch.randint(0, len(vocabulary), (settings.prefix_tokens,), generator=generator)]
    prefix = table[start].clone().float().requires_grad_(True)
    candidates = table[vocabulary].float()
    directions = F.normalize(candidates, dim=-1)
    optimizer = torch.optim.Adam([prefix], lr=settings.lr)
    ids = prefixed_ids(encoder, prompt, settings.prefix_tokens, int(start[0])).to(device)
    positions = slice(1, 1 + settings.prefix_tokens)
    z0 = z0.to(device)
    losses = []
    with torch.enable_grad():
        for _ in range(settings.steps):
            _, rows = nearest_tokens(prefix.detach(), vocabulary, candidates, directions)
            straight_through = rows + (prefix - prefix.detach())
            t = torch.randint(0, model.num_timesteps, (len(z0),), generator=generator).to(device)
            noise = torch.randn(z0.shape, generator=generator).to(device)
            with replaced_token_embeddings(encoder, positions, straight_through):
                context = encoder.transformer(input_ids=ids).last_hidden_state
            eps = model.apply_model(model.q_sample(z0, t, noise), t, context.expand(len(z0), -1, -1))
            loss = F.mse_loss(eps.float(), noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    chosen, _ = nearest_tokens(prefix.detach(), vocabulary, candidates, directions)
    text = f"{encoder.tokenizer.decode(chosen.tolist()).strip()} {prompt}"
    return text, {"start_ids": start.tolist(), "prefix_ids": chosen.tolist(), "losses": losses}
