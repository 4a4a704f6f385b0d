"""Text embeddings: encode prompts with the text encoder, or read them from a precomputed file.

Precomputed file (safetensors, written by `t2v.scripts.encode_prompts`):
    y      float32 [N, 1, L, C]   text-encoder hidden states, padded to L tokens
    mask   int64   [N, L]         1 for a real token, 0 for padding
    y_null float32 [1, 1, L, C]   (optional) the DiT's learned null caption, used as the unconditional input
  metadata (JSON strings): "prompts" (list of N prompts, in order), "encoder" (what produced y),
  "model_max_length".
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from qdiff.io import save_safetensors_atomic


class TextEmbedsError(ValueError):
    pass


def save_text_embeds(path, y, mask, prompts, encoder_name, y_null=None, overwrite=False) -> Path:
    """Write a precomputed-embeddings file atomically. y: [N,1,L,C], mask: [N,L]."""
    if y.shape[0] != len(prompts) or mask.shape[0] != len(prompts):
        raise TextEmbedsError(f"{len(prompts)} prompts but y has {y.shape[0]} rows and mask {mask.shape[0]}")
    tensors = {"y": y.float().contiguous(), "mask": mask.to(torch.int64).contiguous()}
    if y_null is not None:
        tensors["y_null"] = y_null.float().reshape(1, 1, *y.shape[2:]).contiguous()
    meta = {"prompts": json.dumps(list(prompts)), "encoder": encoder_name, "model_max_length": str(y.shape[2])}
    return save_safetensors_atomic(tensors, path, metadata=meta, overwrite=overwrite)


def load_text_embeds(path) -> dict:
    """Read a precomputed-embeddings file -> dict(y, mask, prompts, y_null or None, encoder)."""
    path = Path(path)
    if not path.is_file():
        raise TextEmbedsError(
            f"precomputed text embeddings not found: {path} (make them with "
            "`python -m t2v.scripts.encode_prompts --config CONFIG --prompt_path PROMPTS --out FILE`)"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise TextEmbedsError(f"{path} is not a safetensors text-embedding file: {exc}") from None
    for key in ("y", "mask"):
        if key not in tensors:
            raise TextEmbedsError(f"{path}: missing tensor {key!r} (expected y [N,1,L,C] and mask [N,L])")
    if "prompts" not in meta:
        raise TextEmbedsError(f"{path}: metadata has no 'prompts' entry")
    prompts = json.loads(meta["prompts"])
    return {
        "y": tensors["y"],
        "mask": tensors["mask"],
        "y_null": tensors.get("y_null"),
        "prompts": prompts,
        "encoder": meta.get("encoder", "unknown"),
    }


def select_prompts(embeds: dict, prompts: list[str]) -> dict:
    """Rows of a precomputed file for `prompts` (each must be in the file, verbatim)."""
    index = {p: i for i, p in enumerate(embeds["prompts"])}
    missing = [p for p in prompts if p not in index]
    if missing:
        raise TextEmbedsError(
            f"{len(missing)} prompt(s) are not in the precomputed embeddings (first: {missing[0]!r}); "
            "re-run t2v.scripts.encode_prompts on this prompt file"
        )
    rows = torch.tensor([index[p] for p in prompts], dtype=torch.long)
    return {"y": embeds["y"][rows], "mask": embeds["mask"][rows]}


def read_prompts(path) -> list[str]:
    """One prompt per non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise TextEmbedsError(f"prompt file not found: {path}")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise TextEmbedsError(f"prompt file {path} holds no prompts (one per line expected)")
    return prompts
