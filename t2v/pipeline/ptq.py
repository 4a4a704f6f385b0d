"""Stage 4: calibrate a quantized STDiT on captured calibration data (METHOD.md §3–§6).

    ds = open_calib_data("logs/calib_data", qconfig)
    calibrate(model, qconfig, ds, "logs/calib/w4a8_qvdit")   # -> <outdir>/quant_params.safetensors

Steps, as the reference's `calib` script:
1. `quantize_model(model, qconfig, adapter="stdit")` (TQE terms drawn from a generator seeded with
   `distill.seed`, so every run and every rank starts from the same A, A_out);
2. channel balancing statistics (`calibrate_balancing`) over a fixed, deterministic subset of the
   calibration rows: `balance_rows` rows (default 256) taken from a seeded permutation of all
   (prompt, step, row) samples, so the momentum average is not dominated by the last sampling steps;
   forwarded in mini-batches of `distill.batch_size`;
3. weight quantizer ranges (`init_weight_quantizers`);
4. if `distill.enabled`: TQE/TMD distillation (`qdiff.distill.trainer.distill`). Each iteration draws
   `distill.batch_size` rows uniformly with replacement from all (prompt, step, row) samples, from a
   generator seeded by (seed, rank, iteration), so a resumed run draws exactly the same batches.
   With `distill.fp_targets: precompute` (default) the teacher's output of every calibration row is
   computed once before the loop (fp32, in batches of `distill.batch_size` consecutive rows, split over
   ranks) and cached in the calibration-data folder (`calib_data.fp_targets`; 2 MiB per row for XL/2 at
   16x512x512, e.g. 0.8 GB for 10 prompts x 20 steps x 2 rows), so an iteration runs no teacher forward
   (roughly 2 s of the 4.4 s XL/2 iteration before) and a rerun or resume reads the cache. A target then
   equals the online teacher's value up to fp32 rounding (which already varies with the other rows of
   an online batch). `online` runs the teacher every iteration, as the reference does.

Teacher (the FP targets). Without channel balancing (`balance.method: none`) the teacher is the SAME
model with quantization switched off: a QuantLinear with both switches off and no balancing computes
exactly `F.linear(x, W, b)` (TQE terms only enter the quantized path), so the targets are bit-exact FP
and no second copy of the weights is needed. With balancing, the switched-off path computes
(x/s)·(W·s)ᵀ (and rotates), which equals x·Wᵀ only up to rounding; there the teacher is a frozen deep
copy of the FP model taken before quantization (one extra copy of the weights: 2.7 GB fp32 for XL/2).
Targets are computed in fp32; on CUDA only the student forward runs under bf16 autocast. The eval rows'
targets are computed once; with precomputed targets the FP copy is freed before distillation.

Student: runs in eval mode with the text mask, exactly as the teacher. The reference's student runs in
train mode (10% caption dropout) and without the mask (METHOD.md §5 quirks); we do not copy that, and
the config schema has no switch for it. With `distill.grad_checkpointing`, `distill.checkpoint_blocks` of
the 28 blocks are recomputed in the backward pass (the first ones): "auto" (default) leaves as many unchecked
as fit `distill.checkpoint_memory_fraction` (85%) of the GPU memory, from measured probe steps (all on CPU;
`qdiff.distill.checkpointing`), "all", or a count (the reference: blocks 1–26).
Which blocks are checkpointed does not change the result. When the blocks compile (`distill.compile`: "auto", the
default, compiles on CUDA for runs of 1,000 iterations or more) the distillation runs under
`distill_settings` (`t2v.models.stdit.run_settings`; the same function, other rounding): the blocks take the text
padded to its full length with a key mask (`static_block_inputs`), so batches with new text lengths do not compile
again (packed, they would, and past torch's recompile limit the blocks would silently run eagerly), and the
student's temporal attention trains as "math" (OpenSora's non-flash formula, two batched matmuls and a float32
softmax over the 16 frames, which inductor fuses with the layout work around it; W3A6 XL/2 on an H100: 0.974
instead of 1.063 s per iteration, docs/benchmarks.md session 19; eager, math is 2% slower, so eager runs keep
SDPA). Every other attention, the precomputed targets and the evaluations keep SDPA (an online teacher that is
the student with quantization off runs under the same settings). With `distill.fused_weights` (off by default:
slower on an H100) every layer's effective weight is formed once per iteration, outside the blocks
(`qdiff.distill.weights`).

Timestep ranges (`calib.timestep_ranges` R > 1) and per-timestep-range bit maps: every calibration row
runs with its own sampling step's parameters (`qdiff.api.forward_per_step`; a row's step is found from its
timestep in the data's index, range = step·R // N over the N captured steps). The balancing rows are
grouped by range, so smoothing statistics and static activation ranges are calibrated per range from
that range's rows; weight ranges are initialised for every range and every weight width. Distillation
with R > 1 fails up front (the trainer keeps one range per forward; the ViDiT-Q baselines are PTQ only);
per-step bits with R = 1 distil, each row at its step's bits.

Outputs (rank 0 writes): quant_params.safetensors, quant_config.yaml (the resolved config; reads back
with `QuantConfig.from_yaml`), inference_config.py (the resolved inference config, self-contained),
distill_history.json (loss history and the relative output error of the fully quantized model on
fixed calibration rows, at the PTQ initialisation and at the end), and, while distilling,
distill_state.safetensors (the resumable checkpoint).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import nn

from qdiff.api import (
    calibrate_balancing,
    forward_per_step,
    init_weight_quantizers,
    quant_layers,
    quant_state,
    quant_state_dict,
    quantize_model,
    save_quant_params,
    set_quant_state,
    set_timestep,
)
from qdiff.config import QuantConfig
from qdiff.distill.trainer import CHECKPOINT_NAME, distill
from qdiff.io import atomic_path
from t2v.models.stdit import run_settings
from t2v.pipeline.calib_data import CalibDataError, CalibDataset, fp_targets, model_fingerprint, subsample_steps

log = logging.getLogger(__name__)

QUANT_PARAMS_NAME = "quant_params.safetensors"
QUANT_CONFIG_NAME = "quant_config.yaml"
INFERENCE_CONFIG_NAME = "inference_config.py"
HISTORY_NAME = "distill_history.json"


def distill_settings(cfg, device: torch.device | str) -> dict:
    """`t2v.models.stdit.run_settings` keywords for distilling under the config `cfg` on `device` (see above): when
    the blocks compile (`cfg.compiles(device)`) fixed-shape block inputs and the "math" temporal attention, else
    the model's own."""
    return dict(temporal_attention="math", static_block_inputs=True) if cfg.compiles(device) else {}


class CalibrationMismatchError(ValueError):
    """A resumed run's config differs from the one its output folder was made with."""


def open_calib_data(path, qconfig: QuantConfig) -> CalibDataset:
    """The calibration set with `calib.n_steps` kept steps; checks `calib.n_prompts` against the data."""
    dataset = CalibDataset(path, n_steps=qconfig.calib.n_steps)
    _check_calib(dataset, qconfig)
    return dataset


def check_outdir(outdir, resume: bool, overwrite: bool) -> None:
    """Refuse a folder holding results (or an interrupted run's checkpoint) unless resuming or overwriting."""
    outdir = Path(outdir)
    for name, what in ((QUANT_PARAMS_NAME, "calibration results"), (CHECKPOINT_NAME, "an interrupted distillation")):
        if (outdir / name).exists() and not (resume or overwrite):
            raise FileExistsError(f"{outdir} already holds {what} ({name}); "
                                  "pass --resume to continue or --overwrite to start over")


def calibrate(
    model: nn.Module,
    qconfig: QuantConfig,
    calib: CalibDataset,
    outdir,
    resume: bool = False,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    inference_config: Any = None,
    balance_rows: int = 256,
    eval_rows: int = 8,
    log_every: int = 100,
) -> Path:
    """Quantize `model` in place (PTQ initialisation + optional distillation) and write the outputs.

    Args:
        model: the FP STDiT (eval mode); it is moved to `device` in float32 and quantized in place.
        qconfig: the resolved quantization config.
        calib: calibration data (see `open_calib_data`); its kept steps must match `calib.n_steps`.
        outdir: output folder (created).
        resume: continue an interrupted distillation from `<outdir>/distill_state.safetensors`.
        overwrite: replace existing results (and start the distillation over).
        device: where the model runs (default: the model's device).
        progress: tqdm bars (rank 0).
        inference_config: the InferenceConfig (or its dict) written to inference_config.py;
            default: the one recorded in the calibration data.
        balance_rows: calibration rows forwarded for the channel-balancing statistics.
        eval_rows: fixed calibration rows on which the quantized model's relative error is reported.
    Returns:
        the path of `<outdir>/quant_params.safetensors`.
    """
    outdir = Path(outdir)
    rank, world_size = _world()
    if qconfig.calib.timestep_ranges > 1 and qconfig.distill.enabled:
        raise NotImplementedError(f"calib.timestep_ranges={qconfig.calib.timestep_ranges} with distill.enabled: "
                                  "distillation batches mix timesteps and the trainer keeps one range per forward; "
                                  "set distill.enabled=false (PTQ only) or calib.timestep_ranges=1")
    _check_calib(calib, qconfig)
    qconfig.check_step_segments(calib.num_sampling_steps)
    calib.check_compatible(model)
    check_outdir(outdir, resume, overwrite)
    if resume:
        _check_resumable(outdir, qconfig)
    started = time.time()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device=device, dtype=torch.float32).eval()
    if rank == 0:
        outdir.mkdir(parents=True, exist_ok=True)
        if overwrite and not resume:  # a stale checkpoint of an earlier config must never be resumed later
            (outdir / CHECKPOINT_NAME).unlink(missing_ok=True)
        _write_text(outdir / QUANT_CONFIG_NAME, _render_quant_config(qconfig))
        _write_text(outdir / INFERENCE_CONFIG_NAME, _render_inference_config(inference_config or calib.config))

    # 1. the teacher: a frozen FP copy only where the switched-off quantized model is not exactly FP
    teacher = None
    if qconfig.balance.method != "none":
        teacher = copy.deepcopy(model).requires_grad_(False).eval()
    precompute = qconfig.distill.enabled and qconfig.distill.fp_targets == "precompute"
    model_key = model_fingerprint(model) if precompute else None  # names the FP model in the target cache
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(qconfig.distill.seed)
        quantize_model(model, qconfig, adapter="stdit")

    # 2-3. PTQ initialisation: balancing statistics (per timestep range), then weight quantizer ranges
    num_steps = calib.num_sampling_steps
    step_of = {int(t): s for s, t in enumerate(calib.index["timesteps"])}  # timestep -> captured step
    balance_indices = _balance_indices(len(calib), balance_rows, qconfig.distill.seed)

    def captured_step(index: int) -> int:  # CalibDataset layout: sample i is at kept step (i // 2) % K
        return calib.steps[(index // 2) % len(calib.steps)]

    # Balance rows by timestep range, in drawn order (the passes run in FP: bits do not matter there).
    groups: dict[int, list[int]] = {}
    for index in balance_indices.tolist():
        groups.setdefault(captured_step(index) * qconfig.calib.timestep_ranges // num_steps, []).append(index)
    step = qconfig.distill.batch_size

    def run_balance_rows() -> None:
        for rows in groups.values():
            set_timestep(model, captured_step(rows[0]), num_steps)
            for start in range(0, len(rows), step):
                _forward(model, _to_device(calib.get(rows[start:start + step]), device))

    def student(batch: dict) -> torch.Tensor:
        """The quantized model on rows of mixed steps, each row with its own step's range and bits."""
        steps = [step_of[t] for t in batch["timestep"].tolist()]
        return forward_per_step(model, steps, num_steps, lambda rows: _forward(model, _rows(batch, rows)))

    calibrate_balancing(model, qconfig, run_balance_rows)
    init_weight_quantizers(model)
    if world_size > 1:
        _broadcast_quant_state(model)

    def teacher_fn(batch: dict) -> torch.Tensor:
        if teacher is not None:
            return _forward(teacher, batch)
        with quant_state(model, weight=False, act=False):
            return _forward(model, batch)

    eval_indices = torch.linspace(0, len(calib) - 1, min(eval_rows, len(calib))).round().long()
    eval_batch = _to_device(calib.get(eval_indices), device)
    with torch.no_grad():
        eval_target = teacher_fn(eval_batch)
    report = {"eval_rows": eval_indices.tolist(), "ptq_init": _relative_error(model, student, eval_target, eval_batch)}
    if rank == 0:
        log.info("PTQ initialisation: relative output error %.4g on %d calibration rows",
                 report["ptq_init"]["relative_error"], len(eval_indices))

    # 4. distillation
    if qconfig.distill.enabled:
        cfg = qconfig.distill
        initial = {k: v.clone() for k, v in quant_state_dict(model).items()} if cfg.keep_best else None
        targets = None
        if precompute:
            targets = fp_targets(calib, lambda rows: teacher_fn(_to_device(rows, device)), model_key,
                                 cfg.batch_size, progress=progress)
            del teacher  # every target the run needs is computed: free the FP copy

        def batches(iteration: int) -> dict:
            generator = torch.Generator().manual_seed(_batch_seed(cfg.seed, rank, iteration))
            batch = calib.sample_batch(cfg.batch_size, generator)
            if targets is not None:
                batch["target"] = targets[batch["index"]]
            return _to_device(batch, device)

        with run_settings(model, **distill_settings(cfg, device)):
            result = distill(model, lambda batch: batch["target"] if targets is not None else teacher_fn(batch),
                             batches, cfg, outdir, resume=resume, progress=progress and rank == 0,
                             log_fn=lambda entry: log.info("distill %s", entry) if rank == 0 else None,
                             student_fn=student, overwrite=overwrite, log_every=log_every,
                             checkpoint_modules=model.blocks)
        report.update(history=result["history"], resumed_from=result["resumed_from"],
                      checkpointed_blocks=result["checkpointed_blocks"])
    report["final"] = _relative_error(model, student, eval_target, eval_batch)
    if qconfig.distill.enabled and qconfig.distill.keep_best:
        report["kept"] = "distilled"
        if report["final"]["relative_error"] > report["ptq_init"]["relative_error"]:
            # a run too short or at too high a learning rate can end worse than it started (e.g. W8A8, whose PTQ
            # error is already small): return the better model, say so, and keep the distilled error in the report
            model.load_state_dict(initial, strict=False)
            report.update(kept="ptq_init", distilled=report["final"], final=report["ptq_init"])
            if rank == 0:
                log.warning("distillation ended at relative error %.4g, above the PTQ initialisation's %.4g: keeping "
                            "the PTQ initialisation (distill.keep_best=false keeps the last iterate)",
                            report["distilled"]["relative_error"], report["ptq_init"]["relative_error"])
    report.update(distill=qconfig.distill.to_dict(), world_size=world_size, wall_time_s=time.time() - started)

    path = outdir / QUANT_PARAMS_NAME
    if rank == 0:
        save_quant_params(model, qconfig, path, overwrite=True)
        _write_text(outdir / HISTORY_NAME, json.dumps(report, indent=1) + "\n")
        log.info("calibrated: relative output error %.4g (PTQ initialisation %.4g); wrote %s",
                 report["final"]["relative_error"], report["ptq_init"]["relative_error"], path)
    if world_size > 1:
        dist.barrier()
    return path


# ------------------------------------------------------------------------------ model calls
def _forward(model: nn.Module, batch: dict) -> torch.Tensor:
    """batch (x [n, C, T, H, W], timestep [n], y [n, 1, L, Cc], mask [n, L]) -> output [n, 2C, T, H, W] fp32."""
    return model(batch["x"], batch["timestep"], batch["y"], mask=batch["mask"]).float()


def _rows(batch: dict, rows: torch.Tensor) -> dict:
    return {key: value[rows.to(value.device)] for key, value in batch.items()}


@torch.no_grad()
def _relative_error(model: nn.Module, student_fn, target: torch.Tensor, batch: dict) -> dict:
    """‖out_q − out_fp‖ / ‖out_fp‖ with weights and activations quantized (inference setting); target = out_fp."""
    set_quant_state(model, weight=True, act=True)
    try:
        pred = student_fn(batch)
    finally:
        set_quant_state(model, weight=False, act=False)
    return {"relative_error": float((pred - target).norm() / target.norm()),
            "mse": float((pred - target).pow(2).mean())}


def _to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


# ------------------------------------------------------------------------------ data and seeds
def _check_calib(calib: CalibDataset, qconfig: QuantConfig) -> None:
    expected = subsample_steps(calib.num_sampling_steps, min(qconfig.calib.n_steps, calib.num_sampling_steps))
    if qconfig.calib.n_steps > calib.num_sampling_steps or list(calib.steps) != expected:
        raise CalibDataError(
            f"calib.n_steps={qconfig.calib.n_steps}, but the calibration data {calib.path} hold "
            f"{calib.num_sampling_steps} sampling steps (loaded {len(calib.steps)}); pass "
            f"--set calib.n_steps=N with N <= {calib.num_sampling_steps}, or recapture with more steps"
        )
    num_prompts = len(calib.prompts)
    if num_prompts != qconfig.calib.n_prompts:
        raise CalibDataError(
            f"calib.n_prompts={qconfig.calib.n_prompts}, but the calibration data {calib.path} hold {num_prompts} "
            f"prompt(s); pass --set calib.n_prompts={num_prompts} or capture {qconfig.calib.n_prompts} prompts"
        )


def _balance_indices(num_samples: int, rows: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_samples, generator=generator)[: max(1, rows)]


def _batch_seed(seed: int, rank: int, iteration: int) -> int:
    """A 63-bit seed that is a pure function of (seed, rank, iteration): resumes redraw the same batches."""
    digest = hashlib.sha256(f"qvdit-distill/{seed}/{rank}/{iteration}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def _broadcast_quant_state(model: nn.Module) -> None:
    """Make every rank's quant state (TQE init, Δ, zero points, smoothing) rank 0's, bit for bit."""
    for _, layer in quant_layers(model):
        for key, tensor in layer.state_dict().items():
            if key not in ("weight", "bias") and tensor is not None:
                dist.broadcast(tensor, src=0)  # state_dict tensors share storage with the layer


# ------------------------------------------------------------------------------ files
def _write_text(path: Path, text: str) -> None:
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _render_quant_config(qconfig: QuantConfig) -> str:
    header = "# Resolved quantization config of this calibration run (qdiff.config.QuantConfig.from_yaml reads it).\n"
    return header + yaml.safe_dump(qconfig.to_dict(), sort_keys=False)


def _render_inference_config(config: Any) -> str:
    """An OpenSora-style .py config with every key written out (no `_base_`), so the copy stands alone."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    source = data.pop("source", "")
    data = json.loads(json.dumps(data))  # plain lists/dicts, as the calibration data record it
    lines = [f"# Inference config used for calibration (resolved from {source or 'the calibration data'})."]
    lines += [f"{key} = {value!r}" for key, value in data.items()]
    return "\n".join(lines) + "\n"


def _check_resumable(outdir: Path, qconfig: QuantConfig) -> None:
    saved_path = outdir / QUANT_CONFIG_NAME
    if not saved_path.exists():
        if (outdir / CHECKPOINT_NAME).exists():
            raise CalibrationMismatchError(f"{outdir} has {CHECKPOINT_NAME} but no {QUANT_CONFIG_NAME}; "
                                           "cannot check it was made with this config (use --overwrite)")
        return
    saved = yaml.safe_load(saved_path.read_text(encoding="utf-8"))
    current = json.loads(json.dumps(qconfig.to_dict()))
    free = {"enabled", "checkpoint_every", "grad_checkpointing", "checkpoint_blocks",
            "checkpoint_memory_fraction"}  # do not change the result
    diffs = []
    for section in sorted(set(saved) | set(current)):
        a, b = saved.get(section), current.get(section)
        if section == "distill" and isinstance(a, dict) and isinstance(b, dict):
            a = {k: v for k, v in a.items() if k not in free}
            b = {k: v for k, v in b.items() if k not in free}
        if a != b:
            diffs.append(f"{section}: {outdir} has {a!r}, current {b!r}")
    if diffs:
        raise CalibrationMismatchError(f"cannot resume {outdir} with another config:\n  " + "\n  ".join(diffs))
