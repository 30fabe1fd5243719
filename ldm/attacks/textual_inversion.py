"""The textual-inversion attack ("Circumventing Concept Erasure Methods for Text-to-Image Generative Models",
Pham et al., ICLR 2024; docs/attacks.md): learn, on the erased model, one new word.

The erased model stays frozen; one token embedding ``v`` (a row of the text encoder's token table) is learned
with textual inversion's loss on images of the concept (drawn by the base model, or a folder the user gives):

    min_v  E_{image, caption, t, eps} || eps_erased(q_sample(z0, t, eps), t, E(caption with v)) - eps ||^2

where each caption is a phrasing with the new word in the concept's place. If the erasure only cut the
concept's name off from the model's knowledge, some other input embedding still leads there, and the attack
prompts, the concept's own prompts with the new word in place of its name, draw it again. The word is a
placeholder token whose input embedding is replaced by ``v`` wherever it occurs (``learned_word``), so prompts
stay text and every other token, the empty prompt included, is untouched.
"""
import contextlib
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm.util import UsageError, file_sha256, json_sha256

PLACEHOLDER = "sks"  # a rare one-token word; only its input embedding row is replaced


@dataclass
class TextualInversionSettings:
    """The attack's settings (recorded with every attack)."""
    steps: int = 1000          # Adam steps on the embedding (the CCE code's TI runs use 1000 and more)
    lr: float = 5e-3           # textual inversion's learning rate
    batch_size: int = 4        # images per step
    init_word: str = "object"  # the embedding starts at this word's (textual inversion's initializer token)
    num_images: int = 64       # images of the concept drawn by the base model when no folder is given
    seed: int = 0

    def check(self):
        """Refuse settings the attack cannot run with, one line each."""
        if self.steps < 1 or self.batch_size < 1 or self.num_images < 1:
            raise UsageError("textual inversion: --ti_steps, --ti_batch_size and --ti_num_images must be >= 1")
        if not self.lr > 0:
            raise UsageError(f"textual inversion: --ti_lr must be positive, got {self.lr}")
        return self

    def as_dict(self):
        return asdict(self)


def placeholder_id(tokenizer):
    """The token id of ``PLACEHOLDER`` (one token in CLIP's vocabulary)."""
    ids = tokenizer(PLACEHOLDER, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise UsageError(f"the placeholder word '{PLACEHOLDER}' is not one token for this tokenizer")
    return ids[0]


@contextlib.contextmanager
def learned_word(text_encoder, vector):
    """Within the block, every occurrence of ``PLACEHOLDER`` in a prompt is the word ``vector`` (width,): the
    token table's output is replaced at those positions (gradients flow into ``vector``)."""
    token = placeholder_id(text_encoder.tokenizer)

    def replace(module, inputs, output):
        mask = inputs[0] == token
        if not mask.any():
            return output
        output = output.clone()
        output[mask] = vector.to(output.device, output.dtype)
        return output

    handle = text_encoder.transformer.get_input_embeddings().register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def with_word(prompt, concept):
    """``prompt`` with the concept's name (any case) replaced by ``PLACEHOLDER``; a prompt that does not name it
    gets the word in front."""
    pattern = re.compile(re.escape(concept), re.IGNORECASE)
    return pattern.sub(PLACEHOLDER, prompt) if pattern.search(prompt) else f"{PLACEHOLDER} {prompt}"


def captions(templates):
    """The training captions: each phrasing (``{}`` where the concept goes) with ``PLACEHOLDER`` in its slot."""
    return [" ".join(t.replace("{}", PLACEHOLDER).split()) for t in templates]


def learn_word(model, latents, templates, settings, progress=None):
    """Learn the word on ``model`` (the erased CompVis LatentDiffusion, frozen) from ``latents`` (n, C, H, W: the
    concept's images, encoded) and phrasings ``templates``. Returns ``(vector, losses)``; ``progress`` (a callable
    taking the step's loss) is told each step."""
    settings.check()
    encoder = model.cond_stage_model
    device = model.betas.device
    table = encoder.transformer.get_input_embeddings().weight.detach()
    init = encoder.tokenizer(settings.init_word, add_special_tokens=False)["input_ids"]
    vector = table[init].float().mean(0).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([vector], lr=settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)
    texts = captions(templates)
    latents = latents.to(device)
    model.requires_grad_(False)
    losses = []
    with torch.enable_grad():
        for _ in range(settings.steps):
            pick = torch.randint(0, len(latents), (settings.batch_size,), generator=generator)
            which = torch.randint(0, len(texts), (settings.batch_size,), generator=generator)
            z0 = latents[pick.to(device)]
            t = torch.randint(0, model.num_timesteps, (settings.batch_size,), generator=generator).to(device)
            noise = torch.randn(z0.shape, generator=generator).to(device)
            with learned_word(encoder, vector):
                context = model.get_learned_conditioning([texts[i] for i in which.tolist()])
            eps = model.apply_model(model.q_sample(z0, t, noise), t, context)
            loss = F.mse_loss(eps.float(), noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if progress is not None:
                progress(losses[-1])
    return vector.detach(), losses


def images_record(folder):
    """What names the images a word was learned from, wherever they lie: their count and the SHA-256 of their
    files' SHA-256s, in name order (the folder's path is kept for the reader, not the key)."""
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    return {"images": len(paths), "sha256": json_sha256([file_sha256(p) for p in paths])}
