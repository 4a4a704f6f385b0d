"""Safe reading, checking and qkv-splitting of STDiT checkpoints.

A released OpenSora v1.0 checkpoint (``.pth``/``.pt``, possibly wrapped in ``ema``/``model``/
``state_dict`` and prefixed ``module.``) holds each self-attention as one ``qkv`` linear [3C, C].
``split_qkv`` turns it into the ``q``/``k``/``v`` layout of ``t2v.models.stdit.STDiT`` (rows [0, C)
q, [C, 2C) k, [2C, 3C) v). Pickles are read with ``weights_only=True``: a file that would run code
is refused, never executed. Every failure is a ``CheckpointError`` whose message says what to do.
"""
import inspect
import json
import os
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from qdiff.io import save_safetensors_atomic
from t2v.models.stdit import CONFIG_METADATA_KEY, SINCOS_BUFFERS, STDiT

WRAPPER_KEYS = ("ema", "model", "state_dict")  # first found wins: EMA weights are the ones to sample with
QKV_KEY = re.compile(r"^(blocks\.\d+\.(?:attn|attn_temp))\.qkv\.(weight|bias)$")
BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")
SPLIT_KEY = re.compile(r"^blocks\.\d+\.(?:attn|attn_temp)\.[qkv]\.(?:weight|bias)$")
# Released 16x512x512 checkpoints usually lack the sin-cos tables that would tell the input size.
DEFAULT_INPUT_SIZE = (16, 64, 64)
HEAD_DIM = 72  # STDiT-XL/2 (and OpenSora's other sizes) use 72-dim heads; heads are not visible in shapes
MAX_LISTED = 8


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe, of another architecture, or in the wrong layout."""


def _listed(names, limit: int = MAX_LISTED) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch pickle (``.pth``/``.pt``/other), safely.

    Unwraps ``{"ema"|"model"|"state_dict": sd}`` and strips a leading ``module.`` from every key.
    Raises ``CheckpointError`` if the file is missing, unreadable, would run code, or is not a
    flat dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (check --src)")
    if path.suffix == ".safetensors":
        try:
            obj = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{path} is not a readable safetensors file ({error})") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            # weights_only refuses any global (function or class) outside tensors and plain containers
            if "global" in str(error).lower():
                raise CheckpointError(
                    f"{path} was NOT loaded: its pickle refers to functions or classes beyond tensors and may contain "
                    "code; only if you trust its source, load it yourself and re-save its state dict with safetensors"
                ) from None
            reason = str(error).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
            raise CheckpointError(f"{path} is not a readable checkpoint ({' '.join(reason.split())})") from None
        except Exception as error:  # a corrupt file can fail anywhere in the unpickler (IndexError, KeyError, ...)
            raise CheckpointError(f"{path} is not a readable checkpoint ({type(error).__name__}: {error})") from None

    while isinstance(obj, dict):
        wrapper = next((key for key in WRAPPER_KEYS if isinstance(obj.get(key), dict)), None)
        if wrapper is None:
            break
        obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = type(obj).__name__ if not isinstance(obj, dict) else "a dict that is not name -> tensor"
        raise CheckpointError(f"{path} is not a checkpoint: expected a state dict (name -> tensor), found {found}")
    return {key.removeprefix("module."): value for key, value in obj.items()}


def is_split(state_dict: dict[str, torch.Tensor]) -> bool:
    """True if the self-attentions are already ``q``/``k``/``v`` (no ``qkv`` left)."""
    return any(SPLIT_KEY.match(k) for k in state_dict) and not any(QKV_KEY.match(k) for k in state_dict)


def split_qkv(state_dict: dict[str, torch.Tensor], hidden_size: int) -> dict[str, torch.Tensor]:
    """Merged layout -> split layout: each ``...qkv.weight`` [3C, C] / ``.bias`` [3C] becomes q, k, v.

    Key order is kept (q, k, v take qkv's place); other entries are passed through. The parts are
    copies, so the result can be saved with safetensors (which refuses shared storage).
    """
    if is_split(state_dict):
        raise CheckpointError("the checkpoint is already split (it has attn.q/k/v and no qkv): use it as it is")
    out = {}
    for key, value in state_dict.items():
        match = QKV_KEY.match(key)
        if match is None:
            out[key] = value
            continue
        if value.shape[0] != 3 * hidden_size:
            raise CheckpointError(f"{key} has shape {list(value.shape)}, expected first dim 3*{hidden_size}")
        prefix, kind = match.groups()
        for name, part in zip("qkv", value.chunk(3, dim=0)):
            out[f"{prefix}.{name}.{kind}"] = part.clone()
    return out


def merge_qkv(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split layout -> merged (OpenSora) layout: ``q``, ``k``, ``v`` concatenated into ``qkv`` in their place."""
    if not is_split(state_dict):
        raise CheckpointError("the state dict is not in the split layout (no attn.q/k/v, or a qkv left)")
    out = {}
    for key, value in state_dict.items():
        if not SPLIT_KEY.match(key):
            out[key] = value
            continue
        prefix, name, kind = key.rsplit(".", 2)
        if name == "q":
            parts = [value, state_dict[f"{prefix}.k.{kind}"], state_dict[f"{prefix}.v.{kind}"]]
            out[f"{prefix}.qkv.{kind}"] = torch.cat(parts)
    return out


def infer_stdit_config(state_dict: dict[str, torch.Tensor], num_heads: int | None = None) -> dict:
    """STDiT constructor keywords read from tensor shapes (merged or split layout).

    hidden_size, in_channels, patch_size (``x_embedder.proj.weight``), depth (block indices),
    caption_channels and model_max_length (``y_embedder.y_embedding`` [L, C_cap]), mlp_ratio
    (``mlp.fc1``), pred_sigma (``final_layer.linear``), input_size (the sin-cos tables when present,
    square grid assumed, else ``DEFAULT_INPUT_SIZE``). Heads are not visible in shapes: ``num_heads``
    if given, else hidden_size / 72.
    """
    needed = (
        "x_embedder.proj.weight", "y_embedder.y_embedding", "blocks.0.mlp.fc1.weight", "final_layer.linear.weight"
    )  # fmt: skip
    missing = [k for k in needed if k not in state_dict]
    if missing:
        raise CheckpointError(
            f"not an STDiT (OpenSora v1.0) checkpoint: missing {_listed(missing)}; "
            f"it has {len(state_dict)} entries such as {_listed(sorted(state_dict), 5)}"
        )
    patch_weight = state_dict["x_embedder.proj.weight"]
    if patch_weight.dim() != 5:
        raise CheckpointError(
            f"x_embedder.proj.weight has shape {list(patch_weight.shape)}, expected a Conv3d [C, C_in, p_t, p_h, p_w]"
        )
    hidden_size, in_channels, *patch_size = patch_weight.shape
    if num_heads is None:
        if hidden_size % HEAD_DIM:
            raise CheckpointError(
                f"cannot infer num_heads for hidden size {hidden_size} (not a multiple of {HEAD_DIM}): "
                "give it in --config"
            )
        num_heads = hidden_size // HEAD_DIM
    depth = 1 + max(int(m.group(1)) for m in map(BLOCK_KEY.match, state_dict) if m)
    model_max_length, caption_channels = state_dict["y_embedder.y_embedding"].shape
    patch_volume = patch_size[0] * patch_size[1] * patch_size[2]
    out_channels = state_dict["final_layer.linear.weight"].shape[0] // patch_volume
    if out_channels not in (in_channels, 2 * in_channels):
        raise CheckpointError(f"final_layer.linear predicts {out_channels} channels for {in_channels} input channels")

    input_size = DEFAULT_INPUT_SIZE
    if all(name in state_dict for name in SINCOS_BUFFERS):
        num_spatial = state_dict["pos_embed"].shape[1]
        side = round(num_spatial**0.5)
        if side * side == num_spatial:
            num_temporal = state_dict["pos_embed_temporal"].shape[1]
            input_size = (num_temporal * patch_size[0], side * patch_size[1], side * patch_size[2])
    return dict(
        input_size=list(input_size),
        in_channels=in_channels,
        patch_size=patch_size,
        hidden_size=hidden_size,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden_size,
        pred_sigma=out_channels == 2 * in_channels,
        caption_channels=caption_channels,
        model_max_length=model_max_length,
    )


def check_stdit_state_dict(state_dict: dict[str, torch.Tensor], config: dict) -> None:
    """Strictly load a split-layout state dict into ``STDiT(**config)`` built on the meta device (no memory).

    Raises ``CheckpointError`` listing missing and unexpected keys and shape mismatches (truncated).
    The sin-cos tables may be absent (see ``STDiT.load_state_dict_compat``).
    """
    try:
        with torch.device("meta"):
            model = STDiT(**config)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"invalid STDiT config {config}: {error}") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in SINCOS_BUFFERS}
    given = {k: tuple(v.shape) for k, v in state_dict.items() if k not in SINCOS_BUFFERS}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [
        f"{k} {list(given[k])} vs {list(expected[k])}" for k in expected if k in given and given[k] != expected[k]
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"{len(missing)} missing ({_listed(missing)})" if missing else "",
            f"{len(unexpected)} unexpected ({_listed(unexpected)})" if unexpected else "",
            f"{len(mismatched)} shape mismatches, checkpoint vs model ({_listed(mismatched)})" if mismatched else "",
        ]
        raise CheckpointError(
            "the checkpoint does not fit STDiT with config "
            f"{json.dumps(config)}: " + "; ".join(p for p in problems if p)
            + " (a foreign architecture, or pass the right --config)"
        )
    model.load_state_dict_compat(state_dict, assign=True)


def read_config_file(path: str | os.PathLike) -> dict:
    """Read STDiT keywords from a JSON file, refusing names STDiT does not take."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"config file not found: {path}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"config file {path} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"config file {path} must hold a JSON object of STDiT keywords")
    known = set(inspect.signature(STDiT).parameters)
    unknown = sorted(set(config) - known)
    if unknown:
        raise CheckpointError(f"config file {path} has keys STDiT does not take: {_listed(unknown)}")
    return config


def convert_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, config: dict | None = None, overwrite: bool = False
) -> dict:
    """Split a released STDiT checkpoint into a ``.safetensors`` file loadable by ``STDiT.from_pretrained``.

    The inferred config, updated with ``config``, is checked by a strict load and stored in the file's
    metadata under ``stdit_config``. The sin-cos tables are left out (rebuilt from the config on load).
    The destination is written atomically and is never replaced unless ``overwrite``. Returns the config.
    """
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise CheckpointError(f"destination exists: {dst} (pass --overwrite to replace it)")
    state_dict = load_state_dict_file(src)
    if is_split(state_dict):
        raise CheckpointError(f"{src} is already split (it has attn.q/k/v and no qkv): use it as it is")
    config = config or {}
    resolved = {**infer_stdit_config(state_dict, config.get("num_heads")), **config}
    split = split_qkv(state_dict, resolved["hidden_size"])
    split = {k: v.contiguous() for k, v in split.items() if k not in SINCOS_BUFFERS}
    check_stdit_state_dict(split, resolved)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(split, dst, metadata={"format": "pt", CONFIG_METADATA_KEY: json.dumps(resolved)}, overwrite=True)
    return resolved
