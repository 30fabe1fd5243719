"""Datasets of the concept world for training tiny-sd and its evaluator (CompVis batch layout)."""
import copy
import hashlib
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import CLIPTokenizer

from ldm.data import concepts, prompt_sets
from ldm.data.concepts import ATTRIBUTES, COLORS, OBJECTS, STYLES, TEMPLATES, random_caption_named, render, sample_attributes
from ldm.paths import CLIP_TOKENIZER_DIR

IGNORE = -100  # cross-entropy's ignore_index

# Framing phrases a padded caption may start with (never the evaluation sets' own phrasings).
FRAMES = ("a picture of", "a photo of", "an illustration of", "a rendering of", "a close-up of", "an icon of",
          "a sketch of", "a print of", "a poster of", "a small", "a large", "a simple", "a cute", "a detailed",
          "there is", "here is", "look at", "my favourite", "a card with", "a sticker of")
FILLER_RATE = 0.4


def world_fingerprint(size, seed):
    """What a ``ConceptWorld(size, seed)`` holds: its size, seed and the source (SHA-256) of the renderer
    and of the captions, so that a training run cannot resume on a changed world."""
    source = Path(concepts.__file__).read_bytes() + Path(__file__).read_bytes()
    return {"size": size, "seed": seed, "renderer_sha256": hashlib.sha256(source).hexdigest()}


def held_out_words():
    """Words of the evaluation sets' phrasings that no training template uses: never used as filler, so
    those sets keep testing sentences the model has not seen."""
    def words(templates):
        return set(re.findall(r"[a-z]+", re.sub(r"\{[a-z_]+\}", " ", " ".join(templates).lower())))
    return words(prompt_sets.OTHER_TEMPLATES) - words(TEMPLATES + FRAMES)


def filler_words(tokenizer):
    """Whole words that are one CLIP token each and name no concept: the vocabulary a padded caption
    draws its filler from (about 30,000 words)."""
    concept_parts = [w.lower() for w in OBJECTS + tuple(COLORS) + STYLES[1:] for w in w.split()]
    concept_parts += ["paint", "style", "flat", "colo", "shape", "draw"]
    excluded = held_out_words()
    vocabulary = (token[:-len("</w>")] for token in tokenizer.get_vocab() if token.endswith("</w>"))
    return sorted(w for w in vocabulary if w.isascii() and w.isalpha() and 3 <= len(w) <= 10 and w not in excluded
                  and not any(part in w for part in concept_parts))


class CaptionFiller:
    """Pads a caption, at ``rate``, with a framing phrase or random words before it and random words
    after it, up to the ``max_length``-token context (BOS and EOS included).

    Without it, concept words only ever sit at the few positions the templates give them, and a prompt
    that opens with words the model never saw ("a drawing of a ...") moved the style word to a position
    it had not learned, and lost the style (2-42% on such prompts). Padded captions put every concept
    word at every position and teach that unknown words name nothing, as SD's prompts full of
    unrelated words do.
    """

    def __init__(self, max_length, rate=FILLER_RATE):
        self.tokenizer = CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR), local_files_only=True)
        self.room, self.rate = max_length - 2, rate
        self.words = filler_words(self.tokenizer)
        self.frames = [(frame, self.length(frame)) for frame in FRAMES]

    def length(self, text):
        """Tokens of ``text`` without BOS and EOS."""
        return len(self.tokenizer(text).input_ids) - 2

    def __call__(self, caption, rng):
        if not caption or rng.random() >= self.rate:
            return caption
        free = self.room - self.length(caption)
        if free <= 0:
            return caption
        total = int(rng.integers(1, free + 1))
        before = int(rng.integers(0, total + 1))
        frames = [frame for frame, n in self.frames if n <= before]
        if frames and rng.random() < 0.5:
            prefix = [frames[rng.integers(len(frames))]]
        else:
            prefix = [self.words[i] for i in rng.integers(len(self.words), size=before)]
        suffix = [self.words[i] for i in rng.integers(len(self.words), size=total - before)]
        return " ".join(prefix + [caption] + suffix)


class ConceptWorld(Dataset):
    """``size`` rendered images with random attributes, pre-rendered once (seeded).

    Items are CompVis batches: ``image`` (H, W, 3) float in [-1, 1] (a random ``crop_size`` square of
    it when set), ``caption`` (a fresh random template each time it is read, empty at the template
    module's rate, padded by a ``CaptionFiller`` when ``max_length`` is given), the image's attribute
    indices and ``caption_<attribute>``: the index of the value the caption names, or ``IGNORE``.
    """

    def __init__(self, size=20000, seed=0, empty_caption_rate=0.1, crop_size=None, max_length=None):
        rng = np.random.default_rng(seed)
        self.crop_size = crop_size
        self.filler = CaptionFiller(max_length) if max_length else None
        self.attributes = [sample_attributes(rng) for _ in range(size)]
        self.images = np.stack([render(*attrs, seed=(seed, i)) for i, attrs in enumerate(self.attributes)])
        self.seed, self.empty_caption_rate = seed, empty_caption_rate
        self.reads = np.zeros(size, dtype=np.int64)

    def cropped(self, crop_size):
        """The same images, read as random ``crop_size`` squares (with their own caption draws)."""
        view = copy.copy(self)
        view.crop_size, view.reads = crop_size, np.zeros_like(self.reads)
        return view

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        obj, color, style = self.attributes[i]
        rng = np.random.default_rng((self.seed, i, int(self.reads[i])))
        self.reads[i] += 1
        image = self.images[i]
        if self.crop_size:  # random crops: the autoencoder is convolutional and trains faster on them
            top, left = rng.integers(0, image.shape[0] - self.crop_size + 1, 2)
            image = image[top:top + self.crop_size, left:left + self.crop_size]
        caption, named = random_caption_named(obj, color, style, rng, self.empty_caption_rate)
        if self.filler:
            caption = self.filler(caption, rng)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)).float() / 127.5 - 1,
            "caption": caption,
            # what the caption names, per attribute (IGNORE where it names nothing): the text supervision
            **{f"caption_{k}": ATTRIBUTES[k].index(named[k]) if k in named else IGNORE for k in ATTRIBUTES},
            "object": ATTRIBUTES["object"].index(obj),
            "color": ATTRIBUTES["color"].index(color),
            "style": ATTRIBUTES["style"].index(style),
        }


class WithFirstStageMoments(Dataset):
    """``dataset`` plus ``first_stage_moments``: its images encoded once by a frozen first stage, so
    latent-diffusion training samples latents without running the encoder every step."""

    def __init__(self, dataset, first_stage_model, batch_size=256):
        self.dataset = dataset
        moments = []
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                images = torch.from_numpy(dataset.images[start:start + batch_size]).float() / 127.5 - 1
                posterior = first_stage_model.encode(images.permute(0, 3, 1, 2))
                moments.append(posterior.parameters.half())
        self.moments = torch.cat(moments)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return {**self.dataset[i], "first_stage_moments": self.moments[i]}
