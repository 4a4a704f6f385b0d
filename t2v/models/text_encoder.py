"""T5 text encoder as OpenSora v1.0 uses it (METHOD.md §1), plus a tiny offline preset for tests.

`encode(prompts)` -> dict(y [B, 1, L, C] float, mask [B, L] int64): the tokenizer pads every prompt to
L = model_max_length tokens (truncating longer ones); y is the encoder's last hidden state and mask the
tokenizer's attention mask (1 for real tokens and the end-of-sequence token, 0 for padding).
"""
from __future__ import annotations

import re
import zlib
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, T5Config, T5EncoderModel

T5_REPO = "DeepFloyd/t5-v1_1-xxl"
_DOWNLOAD_HINT = (
    f"It must hold the {T5_REPO} tokenizer and encoder files (config.json, spiece.model, tokenizer_config.json, "
    "special_tokens_map.json and the pytorch_model*.bin / *.safetensors weights). Get them with "
    f"`huggingface-cli download {T5_REPO} --include '*.json' '*.model' 'pytorch_model*' --local-dir <path>` "
    f"or from https://huggingface.co/{T5_REPO}."
)


class T5TextEncoder(nn.Module):
    """T5 encoder + tokenizer producing OpenSora's caption embedding.

    Build it from a local directory (`from_pretrained`, loaded with `local_files_only=True`), or from ready
    components (`model`, `tokenizer`: what `build_tiny_text_encoder` does). The tokenizer is any callable
    with the Hugging Face `__call__` keywords used in `encode`.

    Args:
        from_pretrained: local folder with the DeepFloyd/t5-v1_1-xxl files.
        model_max_length: L, tokens per prompt (120 for OpenSora v1.0).
        device, dtype: where and in which precision the encoder runs.
    """

    def __init__(self, from_pretrained: str | None = None, model_max_length: int = 120, device="cpu",
                 dtype: torch.dtype = torch.float32, *, model: T5EncoderModel | None = None, tokenizer=None):
        super().__init__()
        if (from_pretrained is None) == (model is None):
            raise ValueError("T5TextEncoder: pass either from_pretrained or (model, tokenizer), not both")
        if from_pretrained is not None:
            tokenizer, model = _load_local_t5(from_pretrained, dtype)
        self.tokenizer = tokenizer
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.model_max_length = model_max_length

    @property
    def output_dim(self) -> int:
        """C, the caption channels (4096 for t5-v1_1-xxl)."""
        return self.model.config.d_model

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """prompts (B strings) -> dict(y [B, 1, L, C] in the encoder dtype, mask [B, L] int64)."""
        tokens = self.tokenizer(prompts, max_length=self.model_max_length, padding="max_length", truncation=True,
                                return_attention_mask=True, add_special_tokens=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        input_ids = tokens["input_ids"].to(device)
        mask = tokens["attention_mask"].to(device=device, dtype=torch.int64)
        hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # [B, L, C]
        return {"y": hidden[:, None], "mask": mask}

    @staticmethod
    def null(n: int, y_embedding: torch.Tensor) -> torch.Tensor:
        """The unconditional caption for n prompts: y_embedding [L, C] (the DiT's learned
        `y_embedder.y_embedding`) -> [n, 1, L, C], as OpenSora's `null(n)`."""
        return y_embedding[None].repeat(n, 1, 1)[:, None]


def _load_local_t5(path: str, dtype: torch.dtype):
    """(tokenizer, encoder) from a local folder; a clear error when the folder is missing or incomplete."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"T5 text encoder folder not found: {folder}. {_DOWNLOAD_HINT}")
    has_tokenizer = (folder / "spiece.model").is_file() or (folder / "tokenizer.json").is_file()
    if not (folder / "config.json").is_file() or not has_tokenizer:
        raise FileNotFoundError(f"T5 text encoder folder {folder} lacks config.json or the tokenizer "
                                f"(spiece.model / tokenizer.json). {_DOWNLOAD_HINT}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = T5EncoderModel.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"could not load the T5 text encoder from {folder} ({err}). {_DOWNLOAD_HINT}") from err
    return tokenizer, model


class WordHashTokenizer:
    """A deterministic toy tokenizer: lowercase, split on non-alphanumerics, hash each word into the vocab.

    Ids: 0 = padding, 1 = end of sequence (appended, as T5 does), words -> 2 + crc32(word) % (vocab_size - 2).
    Truncation keeps the end-of-sequence token as the last of max_length tokens.
    """

    pad_token_id = 0
    eos_token_id = 1

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def word_ids(self, text: str) -> list[int]:
        words = [w for w in re.split(r"[^0-9a-z]+", text.lower()) if w]
        return [2 + zlib.crc32(w.encode()) % (self.vocab_size - 2) for w in words]

    def __call__(self, texts: list[str], max_length: int, padding: str = "max_length", truncation: bool = True,
                 return_attention_mask: bool = True, add_special_tokens: bool = True,
                 return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        """texts (B strings) -> dict(input_ids [B, max_length] int64, attention_mask [B, max_length] int64)."""
        if (padding, truncation, add_special_tokens, return_tensors) != ("max_length", True, True, "pt"):
            raise ValueError("WordHashTokenizer only pads to max_length, truncates, adds EOS and returns tensors")
        input_ids = torch.full((len(texts), max_length), self.pad_token_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(texts), max_length), dtype=torch.int64)
        for row, text in enumerate(texts):
            ids = self.word_ids(text)[: max_length - 1] + [self.eos_token_id]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def build_tiny_text_encoder(seed: int = 0, d_model: int = 32, model_max_length: int = 8, vocab_size: int = 256,
                            num_layers: int = 2, num_heads: int = 4, d_ff: int = 64) -> T5TextEncoder:
    """A randomly initialised small T5 encoder (seeded) with `WordHashTokenizer`; no download.

    Same `encode()` interface as the real one: y [B, 1, model_max_length, d_model], mask [B, model_max_length].
    """
    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff,
                      num_layers=num_layers, num_heads=num_heads, feed_forward_proj="gated-gelu",
                      pad_token_id=WordHashTokenizer.pad_token_id, eos_token_id=WordHashTokenizer.eos_token_id,
                      dropout_rate=0.0)
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
    return T5TextEncoder(model_max_length=model_max_length, model=model, tokenizer=WordHashTokenizer(vocab_size))
