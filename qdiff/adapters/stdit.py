"""OpenSora v1.0 STDiT facts for qdiff (METHOD.md §1, §3, §4), as data.

Module names are those of the split-qkv layout (`blocks.N.attn.q`, ...), without the
reference's `model.` prefix.
"""
from __future__ import annotations

from typing import Any, Mapping

__all__ = [
    "BLOCK_LINEARS",
    "DEFAULT_FP_LAYERS",
    "TEMPORAL_LAYER_PATTERN",
    "is_temporal",
    "num_frames_for",
]

# Temporal self-attention linears see [B·S, T, C] inputs (one row per frame): the TQE
# per-frame weight m [1, T, 1] applies to them.
TEMPORAL_LAYER_PATTERN = ".attn_temp."

# Kept in floating point by the papers (<1% of compute): patch/timestep/caption embedders and
# the final layer.
DEFAULT_FP_LAYERS = ("x_embedder", "t_embedder", "t_block", "y_embedder", "final_layer")

# The 13 quantized linears of every block (split-qkv layout), relative to `blocks.N.`.
BLOCK_LINEARS = (
    "attn.q", "attn.k", "attn.v", "attn.proj",
    "attn_temp.q", "attn_temp.k", "attn_temp.v", "attn_temp.proj",
    "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj",
    "mlp.fc1", "mlp.fc2",
)


def is_temporal(layer_name: str) -> bool:
    """True for the temporal-attention linears (`...attn_temp.q` etc.)."""
    return TEMPORAL_LAYER_PATTERN in "." + layer_name


def _get(model_config: Any, key: str) -> Any:
    if isinstance(model_config, Mapping):
        return model_config[key]
    return getattr(model_config, key)


def num_frames_for(layer_name: str, model_config: Any) -> int | None:
    """Number of temporal tokens T a temporal layer sees, None for every other layer.

    model_config: mapping or object with `input_size` (latent T, H, W) and `patch_size`
    (pt, ph, pw), OpenSora's constructor names; T = ceil(input_size[0] / patch_size[0]),
    as the patch embedding zero-pads T up to a multiple of pt.
    """
    if not is_temporal(layer_name):
        return None
    frames = int(_get(model_config, "input_size")[0])
    temporal_patch = int(_get(model_config, "patch_size")[0])
    return -(-frames // temporal_patch)
