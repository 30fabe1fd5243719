"""Text encoders (CompVis ``cond_stage_model``)."""
from pathlib import Path

import torch
import torch.nn as nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.paths import CLIP_TOKENIZER_DIR, SHIPPED_MODELS_DIR, resolve_path
from ldm.util import UsageError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class AbstractEncoder(nn.Module):
    """A conditioning encoder: ``encode(x)`` gives the conditioning tensor."""

    def encode(self, *args, **kwargs):
        raise NotImplementedError


def resolve_text_encoder_dir(version):
    """Map a config's ``version`` to a local folder; hub ids such as ``openai/clip-vit-large-patch14``
    become ``models/clip-vit-large-patch14`` because this project never downloads."""
    path = resolve_path(version)
    if not path.exists() and "/" in str(version) and not Path(version).is_absolute():
        path = SHIPPED_MODELS_DIR / str(version).rstrip("/").split("/")[-1]
    if not (path / "config.json").is_file():
        raise UsageError(
            f"text encoder folder '{path}' has no config.json: put the CLIP text encoder's config.json there "
            f"(and optionally its weights and tokenizer files), or set cond_stage_config.params.version to such a folder"
        )
    return path


def _add_text_model_prefix(module, state_dict, prefix, local_metadata):
    inner = prefix + "transformer."
    for key in [k for k in state_dict if k.startswith(inner) and not k.startswith(inner + "text_model.")]:
        state_dict[inner + "text_model." + key[len(inner):]] = state_dict.pop(key)


def _strip_text_model_prefix(module, state_dict, prefix, *args):
    inner = prefix + "transformer.text_model."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + "transformer." + key[len(inner):]] = state_dict.pop(key)


class FrozenCLIPEmbedder(AbstractEncoder):
    """CLIP text transformer from a local folder, frozen; returns the last hidden state (B, 77, d).

    ``version`` names a folder with ``config.json``. Weights found there are loaded; without them the
    encoder is initialised and expects its weights from the model checkpoint, which CompVis SD v1
    checkpoints contain (``cond_stage_model.transformer.*``). The tokenizer is the folder's own when it
    has ``vocab.json``, else the project's copy of the real CLIP BPE tokenizer. ``device`` is accepted
    for CompVis compatibility; tokens follow the module's device. ``freeze=False`` trains the encoder
    (tiny-sd's training), with its token table kept fixed when ``freeze_token_embedding``.
    """

    LAYERS = ("last", "hidden")

    def __init__(self, version="openai/clip-vit-large-patch14", device=None, max_length=77, freeze=True,
                 layer="last", layer_idx=None, tokenizer_path=None, freeze_token_embedding=False):
        super().__init__()
        if layer not in self.LAYERS:
            raise UsageError(f"FrozenCLIPEmbedder layer '{layer}' unknown; use one of {', '.join(self.LAYERS)}")
        folder = resolve_text_encoder_dir(version)
        if tokenizer_path is None:
            tokenizer_path = folder if (folder / "vocab.json").is_file() else CLIP_TOKENIZER_DIR
        self.tokenizer = CLIPTokenizer.from_pretrained(str(resolve_path(tokenizer_path)), local_files_only=True)
        if any((folder / name).is_file() for name in WEIGHT_FILES):
            self.transformer = CLIPTextModel.from_pretrained(str(folder), local_files_only=True)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # deterministic placeholder until the checkpoint's weights load
                self.transformer = CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder)))
        self.max_length = max_length
        # tokenizer_config says 77; a model trained on shorter contexts (tiny-sd) keeps its tokenizer in step,
        # so a diffusers pipeline built from it pads to the same length
        self.tokenizer.model_max_length = max_length
        self.layer, self.layer_idx = layer, layer_idx
        if not hasattr(self.transformer, "text_model"):
            # transformers >= 5 dropped the `text_model.` level that every CompVis checkpoint stores.
            self.register_state_dict_post_hook(_add_text_model_prefix)
            self.register_load_state_dict_pre_hook(_strip_text_model_prefix)
        if freeze:
            self.freeze()
        elif freeze_token_embedding:  # train the transformer over a fixed token table (49,408 rows: most of
            self.transformer.get_input_embeddings().weight.requires_grad = False  # the optimizer's time)

    def freeze(self):
        """Put the transformer in eval mode and stop its gradients."""
        self.transformer = self.transformer.eval()
        for param in self.parameters():
            param.requires_grad = False

    def tokenize(self, text):
        """CLIP token ids (B, max_length): BOS, tokens, EOS, padded with EOS and truncated."""
        batch = self.tokenizer(text, truncation=True, max_length=self.max_length, padding="max_length",
                               return_tensors="pt")
        return batch["input_ids"]

    def forward(self, text):
        tokens = self.tokenize(text).to(self.transformer.device)
        outputs = self.transformer(input_ids=tokens, output_hidden_states=self.layer == "hidden")
        if self.layer == "hidden":
            return outputs.hidden_states[self.layer_idx]
        return outputs.last_hidden_state

    def encode(self, text):
        """Encode a list of prompts."""
        return self(text)
