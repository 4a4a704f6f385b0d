"""The tiny text-to-video model trained here (docs/tiny_model.md): STDiT in pixel space + a small T5 encoder
over a word-level vocabulary, stored together in one safetensors file.

File layout (`save_tiny_t2v` / `load_tiny_t2v`): tensors `dit.<name>` (STDiT state dict without the sin-cos
tables, which are recomputed) and `text.<name>` (T5EncoderModel state dict); metadata key `tiny_t2v` holds a
JSON object with `dit_config` (STDiT kwargs), `text_config` (T5 sizes), `vocabulary` (word list, id = 2 +
position), `model_max_length`, `prediction` ("eps" or "v"; "eps" when absent), and whatever the trainer adds
(`recipe`, `seed`, `step`, ...).

Only torch, einops, safetensors and transformers are imported here (no diffusers / mmengine), so the trainer
runs on a bare GPU image.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import T5Config, T5EncoderModel

from qdiff.io import save_safetensors_atomic
from t2v.models.stdit import SINCOS_BUFFERS, STDiT
from t2v.schedulers.iddpm import PREDICTIONS

METADATA_KEY = "tiny_t2v"
TRAIN_HINT = ("train it with `python -m t2v.scripts.train_tiny --outdir checkpoints/tiny_t2v` (about 8 minutes on "
              "one H100; docs/tiny_model.md), or point model.from_pretrained / text_encoder.from_pretrained at a "
              "model.safetensors written by that script")


class WordTokenizer:
    """Word-level tokenizer over a fixed vocabulary: ids 0 = padding, 1 = end of sequence, word i -> 2 + i.

    Text is lowercased and split on non-alphanumerics. An unknown word, or a prompt longer than
    max_length - 1 words, is a ValueError naming the word (and the vocabulary) or the length. Called with the
    Hugging Face keywords `T5TextEncoder.encode` uses.
    """

    pad_token_id = 0
    eos_token_id = 1

    def __init__(self, vocabulary: list[str]):
        if len(set(vocabulary)) != len(vocabulary):
            raise ValueError(f"WordTokenizer: duplicate words in the vocabulary {vocabulary}")
        self.vocabulary = list(vocabulary)
        self.word_to_id = {word: 2 + i for i, word in enumerate(self.vocabulary)}

    @property
    def vocab_size(self) -> int:
        return 2 + len(self.vocabulary)

    def word_ids(self, text: str) -> list[int]:
        ids = []
        for word in (w for w in re.split(r"[^0-9a-z]+", text.lower()) if w):
            if word not in self.word_to_id:
                raise ValueError(f"unknown word {word!r} in prompt {text!r}: the tiny model only knows the words "
                                 f"{self.vocabulary}")
            ids.append(self.word_to_id[word])
        return ids

    def __call__(self, texts: list[str], max_length: int, padding: str = "max_length", truncation: bool = True,
                 return_attention_mask: bool = True, add_special_tokens: bool = True,
                 return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        """texts (B strings) -> dict(input_ids [B, max_length] int64, attention_mask [B, max_length] int64)."""
        if (padding, add_special_tokens, return_tensors) != ("max_length", True, "pt"):
            raise ValueError("WordTokenizer only pads to max_length, adds EOS and returns tensors")
        input_ids = torch.full((len(texts), max_length), self.pad_token_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(texts), max_length), dtype=torch.int64)
        for row, text in enumerate(texts):
            ids = self.word_ids(text) + [self.eos_token_id]
            if len(ids) > max_length:
                raise ValueError(f"prompt {text!r} has {len(ids) - 1} words; the tiny model takes at most "
                                 f"{max_length - 1} (model_max_length {max_length} includes the end token)")
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def build_text_model(vocab_size: int, d_model: int = 128, num_layers: int = 2, num_heads: int = 4,
                     d_ff: int = 256) -> T5EncoderModel:
    """A small randomly initialised T5 encoder (gated-GELU FFN, no dropout), in the caller's RNG state."""
    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff,
                      num_layers=num_layers, num_heads=num_heads, feed_forward_proj="gated-gelu",
                      pad_token_id=WordTokenizer.pad_token_id, eos_token_id=WordTokenizer.eos_token_id,
                      decoder_start_token_id=WordTokenizer.pad_token_id, dropout_rate=0.0)
    return T5EncoderModel(config)


class TinyT2V(nn.Module):
    """The trained pair: `dit` (STDiT) and `text` (T5EncoderModel), trained jointly.

    Args:
        dit_config: STDiT keyword arguments (caption_channels must equal text d_model).
        text_config: dict(d_model, num_layers, num_heads, d_ff) for `build_text_model`.
        vocabulary: the tokenizer's words.
        prediction: what the DiT's first C output channels are, "eps" (OpenSora) or "v" (`IDDPM(prediction=)`).
    """

    def __init__(self, dit_config: dict, text_config: dict, vocabulary: list[str], prediction: str = "eps"):
        super().__init__()
        if dit_config["caption_channels"] != text_config["d_model"]:
            raise ValueError(f"dit_config.caption_channels {dit_config['caption_channels']} must equal "
                             f"text_config.d_model {text_config['d_model']}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction: expected one of {PREDICTIONS}, got {prediction!r}")
        self.dit_config, self.text_config = dict(dit_config), dict(text_config)
        self.prediction = prediction
        self.tokenizer = WordTokenizer(vocabulary)
        self.model_max_length = dit_config["model_max_length"]
        self.dit = STDiT(**dit_config)
        self.text = build_text_model(self.tokenizer.vocab_size, **text_config)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask [B, L] int64 -> caption embeddings y [B, 1, L, C_cap] (with grad)."""
        return self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, None]

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """prompts -> dict(input_ids, attention_mask), each int64 [B, L] on the CPU."""
        return self.tokenizer(prompts, max_length=self.model_max_length)

    def metadata(self) -> dict:
        return {"dit_config": self.dit.config, "text_config": self.text_config, "vocabulary": self.tokenizer.vocabulary,
                "model_max_length": self.model_max_length, "prediction": self.prediction}


def tiny_state_dict(module: TinyT2V, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """`dit.*` and `text.*` tensors, sin-cos tables dropped, each its own copy (T5's tied embeddings untied)."""
    tensors = {}
    for prefix, part in (("dit.", module.dit), ("text.", module.text)):
        for name, value in part.state_dict().items():
            if prefix == "dit." and name in SINCOS_BUFFERS:
                continue
            value = value.detach()
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            tensors[prefix + name] = value.clone()
    return tensors


def load_tiny_state_dict(module: TinyT2V, tensors: dict[str, torch.Tensor]) -> None:
    """Strict load of `tiny_state_dict` output (any float dtype) into `module`."""
    dit = {k.removeprefix("dit."): v for k, v in tensors.items() if k.startswith("dit.")}
    text = {k.removeprefix("text."): v for k, v in tensors.items() if k.startswith("text.")}
    other = sorted(k for k in tensors if not k.startswith(("dit.", "text.")))
    if other:
        raise ValueError(f"unexpected tensors {other[:5]} in a tiny_t2v state dict (expected dit.* and text.*)")
    module.dit.load_state_dict_compat(dit)
    module.text.load_state_dict(text, strict=True)


def save_tiny_t2v(path, module: TinyT2V, extra_metadata: dict | None = None,
                  dtype: torch.dtype = torch.float16) -> Path:
    """Write `module` to one safetensors file (floats as `dtype`), atomically; metadata as the module docstring."""
    info = {**module.metadata(), **(extra_metadata or {})}
    return save_safetensors_atomic(tiny_state_dict(module, dtype), path,
                                   metadata={"format": "pt", METADATA_KEY: json.dumps(info)}, overwrite=True)


def read_tiny_metadata(path) -> dict:
    """The JSON metadata of a tiny_t2v file; FileNotFoundError saying how to train one when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tiny trained text-to-video checkpoint not found: {path}; {TRAIN_HINT}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path} is not a tiny_t2v checkpoint: its metadata has no '{METADATA_KEY}' key; {TRAIN_HINT}")
    return json.loads(metadata[METADATA_KEY])


def load_tiny_t2v(path, dtype: torch.dtype = torch.float32) -> tuple[TinyT2V, dict]:
    """(module in eval mode on the CPU in `dtype`, metadata) from a `save_tiny_t2v` file."""
    info = read_tiny_metadata(path)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    module = TinyT2V(info["dit_config"], info["text_config"], info["vocabulary"], info.get("prediction", "eps"))
    load_tiny_state_dict(module, tensors)
    return module.to(dtype).eval(), info
