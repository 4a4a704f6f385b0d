"""Stage 3: capture the DiT's inputs along the FP sampling trajectory, and the loader stage 4 reads them with.

What is stored (METHOD.md §5): for every calibration prompt and every sampling step, exactly what the DiT
received (x_t, timestep, y, mask) for both CFG rows (row 0 = cond, row 1 = uncond, the sampler's
`[cond; uncond]` convention with B = 1). The FP *targets* are not part of the capture: the model's output
during sampling saw x before its bf16 storage rounding, so stage 4 computes them from the stored inputs
with the FP model, once per sample (`fp_targets`), and caches them beside the shards.

On-disk format: a directory holding

    prompt_XXXX.safetensors   one shard per prompt (XXXX = the prompt's index in the prompt file)
        x         [N, 2, C, T, H, W]  bf16 (default) or float32: x_t fed to the model at step 0 ... N-1
        timestep  [N] int64           the original timestep the model received at each step
        y         [2, 1, L, Cc] float32  row 0 the prompt's text embedding, row 1 the null caption
        mask      [2, L] int64        the text mask of each row as the model received it (all ones when
                                      the pipeline passes no mask: the model then attends to all L tokens)
      metadata: "format" = "qvdit-calib-shard", "fingerprint" (JSON: prompt, seed, steps, x_dtype, config,
      checkpoint) so a rerun never mixes shards made with other settings.
    index.json                written atomically LAST (see `write_calib_index`): its presence means complete.
    fp_targets_<key>.safetensors  written by stage 4 (`fp_targets`): the FP model's output for every kept
                              sample, float32 [len(ds), C_out, T, H, W] (2 MiB per sample for STDiT-XL/2 at
                              16x512x512), keyed by index.json, the kept steps and the FP model's weights.

Steps are in sampling order: step 0 is the noisiest (respaced index N-1). A killed capture leaves complete
shards (each is written atomically) and no index.json; rerunning skips those shards unless `overwrite`.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from qdiff.io import atomic_path, save_safetensors_atomic

log = logging.getLogger(__name__)

FORMAT = "qvdit-calib-data"
VERSION = 1
SHARD_FORMAT = "qvdit-calib-shard"
TARGETS_FORMAT = "qvdit-fp-targets"
INDEX_NAME = "index.json"
X_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Config keys that do not change what the DiT sees (where outputs go, how prompts were listed/batched).
_NON_FINGERPRINT_KEYS = ("source", "save_dir", "prompt_path", "batch_size")


class CalibDataError(ValueError):
    """Calibration data are missing, incomplete, malformed or made for another model; the message says which."""


def shard_name(prompt_index: int) -> str:
    return f"prompt_{prompt_index:04d}.safetensors"


def x_dtype_name(dtype: torch.dtype | str) -> str:
    """torch.bfloat16 / 'bfloat16' -> 'bfloat16' (one of X_DTYPES)."""
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in X_DTYPES:
        raise CalibDataError(f"x_dtype: expected one of {sorted(X_DTYPES)}, got {dtype!r}")
    return name


def resolved_config(pipe) -> dict:
    """The pipeline's InferenceConfig as a JSON-able dict, with the step count the sampler really uses."""
    config = json.loads(json.dumps(pipe.cfg.to_dict()))  # tuples -> lists, as index.json will hold them
    config["scheduler"]["num_sampling_steps"] = int(pipe.sampler.num_sampling_steps)
    return config


def _fingerprint(config: dict, prompt: str, prompt_index: int, seed: int, x_dtype: str,
                 ckpt_path: str | None) -> str:
    kept = {k: v for k, v in config.items() if k not in _NON_FINGERPRINT_KEYS}
    return json.dumps({"prompt": prompt, "prompt_index": int(prompt_index), "seed": int(seed), "x_dtype": x_dtype,
                       "ckpt_path": None if ckpt_path is None else str(ckpt_path), "config": kept}, sort_keys=True)


def _read_shard_metadata(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as exc:
        raise CalibDataError(f"{path} is not a readable calibration shard ({exc}); delete it or pass --overwrite") from None


# ------------------------------------------------------------------------------------------ capture
@dataclass
class _TrajectoryRecorder:
    """`on_step` callback of `IDDPM.sample` for one prompt (B = 1): keeps the model's inputs of every step."""

    x_dtype: torch.dtype
    x: list = field(default_factory=list)          # N x [2, C, T, H, W] (x_dtype, CPU)
    timesteps: list = field(default_factory=list)  # N ints
    y: torch.Tensor | None = None                  # [2, 1, L, Cc] float32
    mask: torch.Tensor | None = None               # [2, L] int64

    def __call__(self, step, timestep, x_in, y_in, mask_in) -> None:
        if x_in.shape[0] != 2:
            raise CalibDataError(f"capture expects one prompt per sampling call (x_in [2, ...]), got {tuple(x_in.shape)}")
        if step != len(self.x):
            raise CalibDataError(f"capture: steps arrived out of order (expected {len(self.x)}, got {step})")
        if not bool((timestep == timestep[0]).all()):
            raise CalibDataError(f"capture: the two CFG rows got different timesteps {timestep.tolist()}")
        self.x.append(x_in.detach().to(self.x_dtype).cpu())
        self.timesteps.append(int(timestep[0]))
        if self.y is None:  # y and mask are the same at every step: store them once
            self.y = y_in.detach().float().cpu()
            if mask_in is None:
                self.mask = torch.ones(y_in.shape[0], y_in.shape[2], dtype=torch.int64)
            else:
                self.mask = mask_in.detach().to("cpu", torch.int64)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "x": torch.stack(self.x),                                    # [N, 2, C, T, H, W]
            "timestep": torch.tensor(self.timesteps, dtype=torch.int64),  # [N]
            "y": self.y.contiguous(),                                    # [2, 1, L, Cc]
            "mask": self.mask.contiguous(),                              # [2, L]
        }


@torch.no_grad()
def capture_calib_data(pipe, prompts: Sequence[str], prompt_indices: Sequence[int], outdir, seed: int,
                       x_dtype: torch.dtype | str = torch.bfloat16, overwrite: bool = False, progress: bool = True,
                       *, ckpt_path: str | None = None, write_index: bool = True) -> Path:
    """Sample every prompt once (batch 1) with the FP pipeline and store the DiT inputs of every step.

    Args:
        pipe: a `t2v.pipeline.sample.Pipeline` (FP model; its sampler fixes N and the timesteps).
        prompts / prompt_indices: the prompts to capture and their indices in the prompt file (the noise of
            prompt i is drawn from `seed + i`, as in stage 2, so the trajectory is stage 2's one; with the
            ancestral "iddpm" sampler that holds when stage 2 also ran batch 1).
        outdir: the calibration-data directory (created).
        x_dtype: storage dtype of x (bf16 halves the size; float32 for exact parity with the reference).
        overwrite: recapture existing shards (and drop a previous index.json first); without it, complete
            shards made with the same settings are kept (resume) and a complete directory is refused.
        ckpt_path: recorded in the shards/index (the pipeline does not keep it).
        write_index: write index.json for exactly these prompts at the end. Under torchrun every rank
            captures its share with write_index=False and rank 0 calls `write_calib_index` for all prompts.
    Returns outdir. The FP targets are not captured: stage 4 computes them once from these inputs (`fp_targets`).
    """
    outdir = Path(outdir)
    dtype_name = x_dtype_name(x_dtype)
    index_path = outdir / INDEX_NAME
    if index_path.exists():
        if not overwrite:
            raise FileExistsError(f"{outdir} already holds complete calibration data ({INDEX_NAME}); "
                                  "pass --overwrite to capture it again")
        index_path.unlink(missing_ok=True)  # a killed overwrite must not look complete
    if len(prompts) != len(prompt_indices):
        raise ValueError(f"{len(prompts)} prompts but {len(prompt_indices)} prompt indices")
    outdir.mkdir(parents=True, exist_ok=True)
    # Imported here: sample.py pulls in the model stack, which the loader does not need.
    from t2v.pipeline.sample import sample_latents

    config = resolved_config(pipe)
    for prompt, prompt_index in zip(prompts, prompt_indices):
        path = outdir / shard_name(prompt_index)
        fingerprint = _fingerprint(config, prompt, prompt_index, seed, dtype_name, ckpt_path)
        if path.exists() and not overwrite:
            if _read_shard_metadata(path).get("fingerprint") != fingerprint:
                raise CalibDataError(f"{path} was captured with other settings (prompt, seed, steps, config or "
                                     "checkpoint); pass --overwrite to recapture it")
            log.info("keeping complete shard %s", path)
            continue
        recorder = _TrajectoryRecorder(X_DTYPES[dtype_name])
        sample_latents(pipe, [prompt], [prompt_index], seed, progress=progress, on_step=recorder)
        meta = {"format": SHARD_FORMAT, "version": str(VERSION), "fingerprint": fingerprint}
        save_safetensors_atomic(recorder.tensors(), path, metadata=meta, overwrite=True)
        log.info("saved %s (%d steps)", path, len(recorder.x))
    if write_index:
        write_calib_index(outdir, config, prompts, prompt_indices, seed, dtype_name, ckpt_path=ckpt_path)
    return outdir


def write_calib_index(outdir, config: dict, prompts: Sequence[str], prompt_indices: Sequence[int], seed: int,
                      x_dtype: torch.dtype | str, ckpt_path: str | None = None) -> Path:
    """Check that every prompt's shard exists and was made with these settings, then write index.json.

    `config` is `resolved_config(pipe)`. Shapes and timesteps are read from the shards (which must agree).
    Written atomically; replaces an existing index (capture refuses a complete directory earlier).
    """
    outdir = Path(outdir)
    dtype_name = x_dtype_name(x_dtype)
    shards, timesteps, latent_shape, text_shape = [], None, None, None
    for prompt, prompt_index in zip(prompts, prompt_indices):
        path = outdir / shard_name(prompt_index)
        if not path.is_file():
            raise CalibDataError(f"calibration shard missing: {path} (did a capture process fail?); "
                                 "rerun stage 3 to capture it")
        meta = _read_shard_metadata(path)
        if meta.get("fingerprint") != _fingerprint(config, prompt, prompt_index, seed, dtype_name, ckpt_path):
            raise CalibDataError(f"{path} was captured with other settings; rerun stage 3 with --overwrite")
        with safe_open(str(path), framework="pt") as f:
            shard_timesteps = f.get_slice("timestep")[:].tolist()
            x_shape, y_shape = f.get_slice("x").get_shape(), f.get_slice("y").get_shape()
        if timesteps is None:
            timesteps, latent_shape, text_shape = shard_timesteps, list(x_shape[2:]), list(y_shape[2:])
        elif shard_timesteps != timesteps or list(x_shape[2:]) != latent_shape or list(y_shape[2:]) != text_shape:
            raise CalibDataError(f"{path}: shapes or timesteps differ from the other shards")
        shards.append({"file": path.name, "prompt_index": int(prompt_index)})
    if timesteps is None:
        raise CalibDataError("write_calib_index: no prompts given")
    index = {
        "format": FORMAT,
        "version": VERSION,
        "num_sampling_steps": len(timesteps),
        "timesteps": timesteps,
        "prompts": list(prompts),  # prompts[j] is the prompt of shards[j]
        "shards": shards,
        "x_dtype": dtype_name,
        "latent_shape": latent_shape,
        "text_shape": text_shape,
        "seed": int(seed),
        "config": config,
        "ckpt_path": None if ckpt_path is None else str(ckpt_path),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    path = outdir / INDEX_NAME
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    log.info("wrote %s (%d prompts x %d steps)", path, len(shards), len(timesteps))
    return path


# ------------------------------------------------------------------------------------------ loading
def subsample_steps(num_stored: int, n_steps: int | None) -> list[int]:
    """Kept sampling-step indices: the reference's rule `range(0, N, N // n_steps)` (Q-VDiT `get_quant_calib_data`).

    Step 0 (the noisiest) is always kept. When n_steps divides N this keeps exactly n_steps steps
    (100 stored, 20 -> 0, 5, ..., 95); otherwise the stride N // n_steps yields a few more
    (100, 30 -> stride 3 -> 34 steps), as the reference does. None keeps all N.
    """
    if n_steps is None:
        return list(range(num_stored))
    if not (isinstance(n_steps, int) and 1 <= n_steps <= num_stored):
        raise CalibDataError(f"n_steps: expected an int in 1..{num_stored} (steps stored), got {n_steps!r}")
    return list(range(0, num_stored, num_stored // n_steps))


class CalibDataset:
    """Calibration data written by `capture_calib_data`, as a flat set of (prompt, step, row) samples.

    Sample i is prompt p = i // (2K), kept step k = (i // 2) % K, CFG row r = i % 2 (0 cond, 1 uncond),
    with K = len(ds.steps). `len(ds)` = K x 2 x n_prompts. Shards are read on first access and kept in
    memory (stored dtype; ~1 GB for 10 prompts x 100 steps at 16x64x64 in bf16).

    Args:
        path: the calibration-data directory.
        n_steps: subsample the stored sampling steps at load time (see `subsample_steps`); None keeps all.
    """

    def __init__(self, path, n_steps: int | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CalibDataError(f"calibration data not found: {self.path} is not a directory "
                                 "(capture it with stage 3: shell_scripts/3_get_calib_data.sh)")
        index_path = self.path / INDEX_NAME
        if not index_path.is_file():
            raise CalibDataError(f"{index_path} missing: the capture in {self.path} is incomplete or was killed; "
                                 "rerun stage 3 on the same folder to finish it")
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CalibDataError(f"{index_path} is not valid JSON: {exc}") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise CalibDataError(f"{index_path}: not a calibration-data index (format is not {FORMAT!r})")
        if index.get("version") != VERSION:
            raise CalibDataError(f"{index_path}: format version {index.get('version')!r}, this code reads version "
                                 f"{VERSION}; recapture with stage 3")
        required = ("num_sampling_steps", "timesteps", "prompts", "shards", "x_dtype", "latent_shape", "text_shape")
        missing = [k for k in required if k not in index]
        if missing:
            raise CalibDataError(f"{index_path}: missing key(s) {missing}")
        self.index = index
        self.num_sampling_steps = int(index["num_sampling_steps"])
        self.steps = subsample_steps(self.num_sampling_steps, n_steps)
        self.timesteps = torch.tensor(index["timesteps"], dtype=torch.int64)[self.steps]  # [K]
        self.prompts = list(index["prompts"])
        self.config = dict(index.get("config") or {})
        self.latent_shape = tuple(int(s) for s in index["latent_shape"])  # (C, T, H, W)
        self.text_shape = tuple(int(s) for s in index["text_shape"])  # (L, Cc)
        self.x_dtype = index["x_dtype"]
        self.shard_paths = [self.path / s["file"] for s in index["shards"]]
        for shard in self.shard_paths:
            if not shard.is_file():
                raise CalibDataError(f"calibration shard missing: {shard} (listed in {index_path}); recapture it "
                                     "with stage 3 (complete shards are kept)")
        self._data: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.shard_paths) * len(self.steps) * 2

    def __repr__(self) -> str:
        return (f"CalibDataset({str(self.path)!r}, prompts={len(self.shard_paths)}, steps={len(self.steps)}/"
                f"{self.num_sampling_steps}, latent_shape={self.latent_shape}, x_dtype={self.x_dtype})")

    def _load(self) -> dict[str, torch.Tensor]:
        """Read every shard once -> x [P, K, 2, C, T, H, W] (stored dtype), y [P, 2, 1, L, Cc], mask [P, 2, L]."""
        if self._data is not None:
            return self._data
        steps = torch.tensor(self.steps, dtype=torch.long)
        expected_x = (self.num_sampling_steps, 2, *self.latent_shape)
        xs, ys, masks = [], [], []
        for path in self.shard_paths:
            try:
                with safe_open(str(path), framework="pt") as f:
                    shard = {k: f.get_tensor(k) for k in ("x", "timestep", "y", "mask")}
            except Exception as exc:
                raise CalibDataError(f"{path}: unreadable calibration shard ({exc})") from None
            if tuple(shard["x"].shape) != expected_x:
                raise CalibDataError(f"{path}: x has shape {tuple(shard['x'].shape)}, index says {expected_x}")
            if shard["timestep"].tolist() != self.index["timesteps"]:
                raise CalibDataError(f"{path}: its timesteps differ from {self.path / INDEX_NAME}")
            xs.append(shard["x"][steps])
            ys.append(shard["y"].float())
            masks.append(shard["mask"].to(torch.int64))
        self._data = {"x": torch.stack(xs), "y": torch.stack(ys), "mask": torch.stack(masks)}
        return self._data

    def get(self, indices) -> dict[str, torch.Tensor]:
        """Samples by flat index -> dict(x float32 [n, C, T, H, W], timestep int64 [n], y float32 [n, 1, L, Cc],
        mask int64 [n, L], index int64 [n] (the flat indices)), on the CPU."""
        indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= len(self)):
            raise IndexError(f"calibration sample index out of range 0..{len(self) - 1}")
        data = self._load()
        num_kept = len(self.steps)
        prompt, step, row = indices // (2 * num_kept), (indices // 2) % num_kept, indices % 2
        return {
            "x": data["x"][prompt, step, row].float(),
            "timestep": self.timesteps[step].clone(),
            "y": data["y"][prompt, row],
            "mask": data["mask"][prompt, row],
            "index": indices.clone(),
        }

    def sample_batch(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """`batch_size` samples drawn uniformly WITH replacement from all (prompt, step, row) samples, as the
        reference's distillation does (METHOD.md §5); reproducible under `generator`. Same dict as `get`."""
        return self.get(torch.randint(len(self), (batch_size,), generator=generator))

    def check_compatible(self, model_config_or_input_size, caption_channels: int | None = None,
                         model_max_length: int | None = None) -> None:
        """Raise CalibDataError when these data were captured for another model or resolution.

        model_config_or_input_size: an STDiT (its `.config`), a mapping with STDiT's constructor names
            (`input_size`, and optionally `in_channels`, `caption_channels`, `model_max_length`), or the
            latent input size (T, H, W). Explicit `caption_channels` / `model_max_length` override the mapping.
        """
        source = model_config_or_input_size
        source = getattr(source, "config", source)  # an STDiT module keeps its constructor arguments there
        if isinstance(source, Mapping):
            input_size = source.get("input_size")
            in_channels = source.get("in_channels")
            caption_channels = source.get("caption_channels") if caption_channels is None else caption_channels
            model_max_length = source.get("model_max_length") if model_max_length is None else model_max_length
        else:
            input_size, in_channels = source, None
        diffs = []
        if input_size is not None and tuple(int(s) for s in input_size) != self.latent_shape[1:]:
            diffs.append(f"latent input size (T, H, W): data {self.latent_shape[1:]}, model {tuple(input_size)}")
        if in_channels is not None and int(in_channels) != self.latent_shape[0]:
            diffs.append(f"latent channels: data {self.latent_shape[0]}, model {in_channels}")
        if caption_channels is not None and int(caption_channels) != self.text_shape[1]:
            diffs.append(f"caption channels: data {self.text_shape[1]}, model {caption_channels}")
        if model_max_length is not None and int(model_max_length) != self.text_shape[0]:
            diffs.append(f"text tokens (model_max_length): data {self.text_shape[0]}, model {model_max_length}")
        if diffs:
            raise CalibDataError(f"calibration data {self.path} were captured for another model or resolution: "
                                 + "; ".join(diffs) + " (recapture them with stage 3 for this config)")


# ------------------------------------------------------------------------------------------ FP targets
@torch.no_grad()
def model_fingerprint(model: nn.Module) -> str:
    """sha256 of a model's state (names, shapes, dtypes and bytes of every parameter and buffer)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.detach().reshape(-1).cpu().view(torch.uint8).numpy())
    return digest.hexdigest()


@torch.no_grad()
def fp_targets(calib: CalibDataset, teacher_fn, model_key: str, batch_size: int = 4, progress: bool = True,
               cache: bool = True) -> torch.Tensor:
    """The FP model's output for every sample of `calib` -> float32 [len(calib), C_out, T, H, W] on the CPU.

    Args:
        teacher_fn: CPU batch (as `calib.get`) -> FP output [n, C_out, T, H, W] (any device).
        model_key: identifies the FP model (`model_fingerprint`); part of the cache key.
        batch_size: samples per teacher forward (consecutive samples: the two CFG rows of a step).
        cache: read/write `fp_targets_<key>.safetensors` in the calibration-data folder (skipped with a
            warning when the folder is read-only).
    Under torch.distributed each rank computes every world_size-th batch and all ranks gather all;
    rank 0 writes the cache. A target equals the FP model's output on its row up to fp32 rounding:
    the online teacher's value also varies at that level with the other rows of its batch.
    """
    fingerprint = json.dumps({"index": hashlib.sha256((calib.path / INDEX_NAME).read_bytes()).hexdigest(),
                              "steps": calib.steps, "model": model_key}, sort_keys=True)
    path = calib.path / f"fp_targets_{hashlib.sha256(fingerprint.encode()).hexdigest()[:16]}.safetensors"
    targets = _read_targets(path, fingerprint, len(calib)) if cache else None
    if targets is not None:
        log.info("FP targets read from %s", path)
        return targets
    distributed = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    per_round = batch_size * world_size
    kept = torch.arange(per_round)
    for start in tqdm(range(0, len(calib), per_round), desc="FP targets", disable=not progress or rank != 0):
        count = min(per_round, len(calib) - start)
        rows = start + kept.clamp(max=count - 1)  # the last round padded with repeats of its last row
        pred = teacher_fn(calib.get(rows[rank::world_size])).float().contiguous()
        parts = [pred]
        if world_size > 1:
            parts = [torch.empty_like(pred) for _ in range(world_size)]
            dist.all_gather(parts, pred)
        if targets is None:
            targets = torch.empty((len(calib), *pred.shape[1:]), dtype=torch.float32)
        for source, part in enumerate(parts):
            real = kept[source::world_size] < count
            targets[rows[source::world_size][real]] = part.cpu()[real]
    if cache and rank == 0:
        try:
            save_safetensors_atomic({"targets": targets}, path, metadata={"format": TARGETS_FORMAT,
                                                                         "fingerprint": fingerprint}, overwrite=True)
            log.info("FP targets of %d samples cached in %s", len(calib), path)
        except OSError as exc:
            log.warning("FP targets not cached (%s)", exc)
    return targets


def _read_targets(path: Path, fingerprint: str, num_samples: int) -> torch.Tensor | None:
    """The cached targets if `path` holds a readable, matching file, else None."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") != fingerprint:
                return None
            targets = f.get_tensor("targets")
    except Exception as exc:  # a damaged cache is recomputed
        log.warning("ignoring unreadable FP-target cache %s (%s)", path, exc)
        return None
    return targets if targets.shape[0] == num_samples and targets.dtype == torch.float32 else None
