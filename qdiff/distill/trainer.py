"""The TQE/TMD distillation loop (METHOD.md §5): train the quantized student to match the FP teacher.

    history = distill(student, teacher_fn, batches, cfg.distill, ckpt_dir, student_fn=run_model)

Model-agnostic: the caller says how a batch is drawn (`batches(iteration)`), how the teacher and the
student are called on it (`teacher_fn(batch)`, `student_fn(batch)`, both returning [B, C, T, H, W]).

What trains (as the reference): the TQE terms A, B, A_out, B_out and the per-frame weights m (lr
`cfg.lr`) and the weight quantizers' Δ (lr `cfg.lr_delta`), from `qdiff.api.trainable_parameters`;
everything else is frozen for the run (the flags are restored afterwards). AdamW with
`cfg.weight_decay`, cosine annealing to 0 over `cfg.iterations`. Weights are fake-quantized during
training; activations only if `cfg.quantize_activations` (the reference trains with FP activations).
On CUDA the student forward runs under bf16 autocast (TQE parameters and the loss stay fp32); on
CPU everything is fp32.

Speed (issue 4):
- `cfg.fused_weights` (off by default; measured slower on an H100): every layer's W_eff is formed once per iteration, outside the
  blocks and outside autocast, with a fused forward and a hand-written straight-through backward
  (`qdiff.distill.weights`); values and gradients equal the per-call autograd chain bit for bit on
  CPU. On CUDA B·A is now an fp32 product, as at inference; false = each layer call rebuilds W_eff
  under autocast (B·A in bf16 there), the behaviour before.
- Gradient checkpointing of `checkpoint_modules` (the caller's blocks) when `cfg.grad_checkpointing`:
  `cfg.checkpoint_blocks` of them, the first ones ("all", an int, or "auto": on CUDA as many blocks
  unchecked as fit `cfg.checkpoint_memory_fraction` (0.85) of the memory available to the run (free +
  already reserved by this process), from three or four probe steps before the loop (forward + backward,
  no optimizer step): the peak with every block checkpointed, the memory one unchecked block keeps
  after the forward, and a check of the chosen count; any out-of-memory probe means all checkpointed;
  on CPU all; see `qdiff.distill.checkpointing`). Which blocks are recomputed changes nothing else.
- `cfg.compile` (`cfg.compiles(device)`: "auto", the default, compiles on CUDA for runs of 1,000 iterations or
  more, falling back to eager for any graph that fails to compile): each of `checkpoint_modules` runs
  `torch.compile(forward, dynamic=False)` for the run
  (inside the checkpoint wrapper, so the recompute is compiled too), with inductor's mix-order reduction
  off (it broke the shape of STDiT-XL/2's `mlp.fc1.lora_a_out` gradient; `qdiff.distill.checkpointing`).
  The first iteration (or the "auto" probe) pays the compilation; a block that graph-breaks still computes
  the same function. `cfg.compile_memory_budget` (0.5) has each compiled block save about half of its
  activations and recompute the cheap rest in its backward, so "auto" leaves more blocks unchecked (STDiT-XL/2
  on an H100: 28 instead of 14 unchecked, 1.09–1.10 → 1.04–1.07 s per W3A6 iteration; docs/benchmarks.md
  session 18).
- The teacher is whatever `teacher_fn` does: stage 4 passes targets computed once per calibration
  row (`t2v.pipeline.calib_data.fp_targets`) instead of running the FP model every iteration.

Timestep ranges: a batch mixes timesteps (rows are drawn from all (step, row) pairs), so a model whose
layers keep several timestep ranges (`num_ranges > 1`) cannot pick one range per forward; `distill`
raises NotImplementedError for such models instead of silently training range 0 only.

Checkpoint `<ckpt_dir>/distill_state.safetensors` (atomic; every `cfg.checkpoint_every` iterations
and at the end): the trainable tensors by parameter name, the AdamW moments and step counts
(`optim.<i>.<key>`), and a JSON header with the iteration, param groups, scheduler state, loss
history and the DistillConfig. `resume=True` continues from it; since batches are a function of the
iteration index and the loop has no other randomness, a resumed run ends bit-identical to an
uninterrupted one on CPU.

Multi-process (torchrun, torch.distributed initialised): after each backward the trainable
gradients (small: only the TQE/Δ tensors) are averaged with one all_reduce, so every rank takes the
same step; the caller draws a different batch per rank. Losses are averaged across ranks too, so
every rank sees the same value (and stops together on divergence). Rank 0 writes the checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from qdiff.api import quant_layers, quant_state, trainable_parameters
from qdiff.config import DistillConfig
from qdiff.distill.checkpointing import CheckpointPlan, checkpointed, compiled, probe_checkpoint_count
from qdiff.distill.tmd import distill_loss
from qdiff.distill.weights import weights_once
from qdiff.io import save_safetensors_atomic

__all__ = ["CHECKPOINT_NAME", "DistillDivergedError", "DistillStateError", "distill"]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "distill_state.safetensors"
_FORMAT = "qdiff-distill-state"
# DistillConfig fields that may change between a run and its resume (they do not change the result).
_RESUME_FREE_FIELDS = ("enabled", "checkpoint_every", "grad_checkpointing", "checkpoint_blocks",
                       "checkpoint_memory_fraction")

Batch = dict[str, Any]


class DistillDivergedError(RuntimeError):
    """The loss (or a gradient) became NaN/Inf; the message names the iteration and the last good checkpoint."""

    def __init__(self, iteration: int, checkpoint: Path | None, what: str):
        self.iteration, self.checkpoint = iteration, checkpoint
        where = (
            f"last good checkpoint: {checkpoint} (resume from it with a lower lr)" if checkpoint is not None
            else "no checkpoint was written yet"
        )
        super().__init__(f"distillation diverged at iteration {iteration}: {what}; {where}")


class DistillStateError(ValueError):
    """A distill-state checkpoint does not fit this run (other params, config or format)."""


def distill(
    student: nn.Module,
    teacher_fn: Callable[[Batch], torch.Tensor],
    batches: Callable[[int], Batch],
    cfg: DistillConfig,
    ckpt_dir,
    resume: bool = False,
    progress: bool = True,
    log_fn: Callable[[dict], None] | None = None,
    *,
    student_fn: Callable[[Batch], torch.Tensor] | None = None,
    overwrite: bool = False,
    log_every: int = 100,
    checkpoint_modules: Sequence[nn.Module] = (),
) -> dict:
    """Distill `student` (a model holding QuantLinear layers) towards `teacher_fn`'s outputs.

    Args:
        student: the quantized model; its quantizers should be initialised (`init_weight_quantizers`).
        teacher_fn: batch -> FP target [B, C, T, H, W]; called under no_grad (the caller must make
            it the FP computation, e.g. quantization switched off, or look up precomputed targets).
        batches: iteration index (0-based) -> batch; must be a pure function of the index (and rank).
        cfg: the `distill` section of the QuantConfig.
        ckpt_dir: folder of `distill_state.safetensors`.
        resume: continue from the checkpoint in `ckpt_dir` (start fresh if there is none).
        progress: tqdm bar (rank 0 only) with the loss terms in the postfix.
        log_fn: called every `log_every` iterations and at the end with the latest history entry.
        student_fn: batch -> student output [B, C, T, H, W]; default `student(**batch)`.
        overwrite: without `resume`, replace an existing checkpoint (else FileExistsError).
        checkpoint_modules: the blocks gradient checkpointing may cover (the first
            `cfg.checkpoint_blocks` of them are recomputed in the backward pass).
    Returns:
        dict(history=[{iteration, loss, mse, tmd, lr}, ...] for every iteration 1..N (1-based,
        iteration k = after k optimizer steps), resumed_from=int or None, checkpoint=Path,
        checkpointed_blocks=int).
    Raises:
        DistillDivergedError on a NaN/Inf loss or gradient (nothing non-finite is ever checkpointed).
    """
    multi_range = [name for name, layer in quant_layers(student) if layer.num_ranges > 1]
    if multi_range:
        raise NotImplementedError(
            f"distill: layers with several timestep ranges (e.g. {multi_range[0]}) are not supported: "
            "distillation batches mix timesteps, so one range cannot be selected per forward"
        )
    groups = trainable_parameters(student)
    if not groups["tqe"] and not groups["delta"]:
        raise ValueError("distill: the student has no trainable TQE terms or weight steps (tqe: null, learnable_delta: false?)")
    student_fn = student_fn or (lambda batch: student(**batch))
    ckpt_path = Path(ckpt_dir) / CHECKPOINT_NAME
    rank, world_size = _world()
    if ckpt_path.exists() and not resume and not overwrite:
        raise FileExistsError(f"{ckpt_path} already exists; pass --resume to continue it or --overwrite to start over")

    names = _parameter_names(student)
    trainable = groups["tqe"] + groups["delta"]
    optimizer = torch.optim.AdamW(
        [{"params": groups["tqe"], "lr": cfg.lr, "name": "tqe"},
         {"params": groups["delta"], "lr": cfg.lr_delta, "name": "delta"}],
        weight_decay=cfg.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.iterations, eta_min=0.0)
    history: list[dict] = []
    start, resumed_from, last_good = 0, None, None
    if resume and ckpt_path.exists():
        start, history = _load_state(ckpt_path, student, names, trainable, optimizer, scheduler, cfg)
        resumed_from, last_good = start, ckpt_path
        log.info("resuming distillation from %s at iteration %d/%d", ckpt_path, start, cfg.iterations)

    device = trainable[0].device
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    )
    weights = (lambda: weights_once(student)) if cfg.fused_weights else nullcontext

    def forward_backward(batch: Batch, after_forward: Callable[[], None] | None = None) -> tuple[torch.Tensor, dict]:
        """Loss of one batch, its gradients accumulated into the zeroed .grad of the trainable tensors.

        `after_forward()` (the "auto" probe's memory reading) runs between the loss and its backward.
        """
        with torch.no_grad():
            target = teacher_fn(batch).float().detach()  # a constant, whatever teacher_fn returns
        with weights():
            with autocast:
                pred = student_fn(batch)
            loss, terms = distill_loss(pred.float(), target, lam=cfg.tmd_lambda, use_tmd=cfg.tmd,
                                       reference_layout=cfg.tmd_reference_layout)
            optimizer.zero_grad(set_to_none=False)
            if after_forward is not None:
                after_forward()
            loss.backward()
        return loss, terms

    bar = tqdm(total=cfg.iterations, initial=start, disable=not progress or rank != 0, desc="distill")
    modules = list(checkpoint_modules)
    compiling = nullcontext()
    if modules and cfg.compiles(device):
        # "auto" falls back to eager wherever a graph fails to compile; an explicit `compile: true` raises
        compiling = compiled(modules, memory_budget=cfg.compile_memory_budget, fallback=cfg.compile == "auto")
        if rank == 0:
            log.info("distill.compile %s: compiling %d blocks (the first iteration pays for it)", cfg.compile,
                     len(modules))
    with _frozen_except(student, trainable), quant_state(student, weight=True, act=cfg.quantize_activations), \
            compiling:
        plan = _checkpoint_plan(cfg, modules, device, lambda after: forward_backward(batches(start), after),
                                probe=start < cfg.iterations)
        num_checkpointed = plan.checkpointed
        if rank == 0 and modules:
            log.info("gradient checkpointing: %d of %d blocks", num_checkpointed, len(modules))
            if plan.budget is not None:
                log.info(plan.describe())
        with checkpointed(modules[:num_checkpointed]):
            for iteration in range(start, cfg.iterations):
                loss, terms = forward_backward(batches(iteration))
                grads_finite = _average_gradients(trainable, world_size)
                values = torch.stack([loss.detach(), terms["mse"].detach(), terms["tmd"].detach(), grads_finite])
                if world_size > 1:
                    dist.all_reduce(values)  # sum; the loss is averaged below, the flags counted
                    values[:3] /= world_size
                loss_value, mse_value, tmd_value, finite_ranks = values.tolist()
                if not math.isfinite(loss_value):
                    raise DistillDivergedError(iteration + 1, last_good, f"loss is {loss_value}")
                if finite_ranks < world_size:
                    raise DistillDivergedError(iteration + 1, last_good, "a gradient is NaN/Inf")
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                entry = {"iteration": iteration + 1, "loss": loss_value, "mse": mse_value, "tmd": tmd_value, "lr": lr}
                history.append(entry)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4g}", mse=f"{mse_value:.4g}", tmd=f"{tmd_value:.3g}")
                done = iteration + 1 == cfg.iterations
                if log_fn is not None and ((iteration + 1) % log_every == 0 or done):
                    log_fn(dict(entry))
                if (iteration + 1) % cfg.checkpoint_every == 0 or done:
                    if not all(torch.isfinite(p).all() for p in trainable):  # belt and braces: never save NaN
                        raise DistillDivergedError(iteration + 1, last_good, "a trainable tensor is NaN/Inf")
                    if rank == 0:
                        _save_state(ckpt_path, iteration + 1, names, trainable, optimizer, scheduler, history, cfg)
                    if world_size > 1:
                        dist.barrier()
                    last_good = ckpt_path
    bar.close()
    return {"history": history, "resumed_from": resumed_from, "checkpoint": ckpt_path,
            "checkpointed_blocks": num_checkpointed, "checkpoint_plan": plan}


# ------------------------------------------------------------------------------ helpers
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _checkpoint_plan(cfg: DistillConfig, modules: list[nn.Module], device: torch.device,
                     step: Callable[[Callable[[], None]], Any], probe: bool) -> CheckpointPlan:
    """How many of `modules` (the first ones) to checkpoint; "auto" runs `step` (forward + backward) to measure.

    `step(after_forward)` runs one training step and calls `after_forward()` between loss and backward.
    """
    count = len(modules)
    if not cfg.grad_checkpointing or not modules:
        return CheckpointPlan(checkpointed=0, num_blocks=count)
    if cfg.checkpoint_blocks != "auto":
        chosen = count if cfg.checkpoint_blocks == "all" else min(cfg.checkpoint_blocks, count)
        return CheckpointPlan(checkpointed=chosen, num_blocks=count)
    if device.type != "cuda" or not probe:
        return CheckpointPlan(checkpointed=count, num_blocks=count, reason="no probe (CPU, or no iteration left)")

    def held_and_peak(checkpointed_count: int) -> tuple[float, float]:
        held = []  # allocated at the end of the forward minus at the start (gradients/optimizer state excluded)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        out_of_memory = False
        try:
            with checkpointed(modules[:checkpointed_count]):
                step(lambda: held.append(torch.cuda.memory_allocated(device) - start))
        except torch.OutOfMemoryError:
            out_of_memory = True
        if out_of_memory:  # outside the except block: the failed step's tensors are released by now
            torch.cuda.empty_cache()
            raise torch.OutOfMemoryError(f"checkpoint_blocks auto: the probe step with {checkpointed_count} "
                                         "blocks checkpointed ran out of memory")
        return float(held[0]), float(torch.cuda.max_memory_allocated(device))

    free, _ = torch.cuda.mem_get_info(device)
    available = float(free + torch.cuda.memory_reserved(device))  # what this process may use
    plan = probe_checkpoint_count(count, held_and_peak, cfg.checkpoint_memory_fraction * available, available)
    torch.cuda.empty_cache()
    return plan


def _parameter_names(model: nn.Module) -> dict[int, str]:
    return {id(param): name for name, param in model.named_parameters(remove_duplicate=False)}


def _average_gradients(params: list[nn.Parameter], world_size: int) -> torch.Tensor:
    """Average grads over ranks (one all_reduce of the flattened grads); -> 1.0 if all finite, else 0.0."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    if world_size > 1:
        dist.all_reduce(flat)
        flat /= world_size
        offset = 0
        for param, grad in zip(params, grads):
            count = grad.numel()
            if param.grad is not None:  # a parameter unused by the forward stays without a gradient
                param.grad.copy_(flat[offset:offset + count].view_as(grad))
            offset += count
    return torch.isfinite(flat).all().to(torch.float32)


@contextmanager
def _frozen_except(model: nn.Module, trainable: list[nn.Parameter]):
    """requires_grad only on `trainable` for the duration; the previous flags are restored."""
    params = list(model.parameters())
    before = [p.requires_grad for p in params]
    keep = {id(p) for p in trainable}
    for p in params:
        p.requires_grad_(id(p) in keep)
    try:
        yield
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)


def _config_dict(cfg: DistillConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RESUME_FREE_FIELDS}


def _save_state(path: Path, iteration: int, names: dict[int, str], trainable: list[nn.Parameter],
                optimizer: torch.optim.Optimizer, scheduler, history: list[dict], cfg: DistillConfig) -> None:
    tensors = {f"param.{names[id(p)]}": p.detach() for p in trainable}
    optim_state = optimizer.state_dict()
    for index, state in optim_state["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    meta = {
        "format": _FORMAT,
        "iteration": str(iteration),
        "param_order": json.dumps([names[id(p)] for p in trainable]),
        "param_groups": json.dumps(optim_state["param_groups"]),
        "scheduler": json.dumps(scheduler.state_dict()),
        "history": json.dumps(history),
        "config": json.dumps(_config_dict(cfg), sort_keys=True),
    }
    save_safetensors_atomic(tensors, path, metadata=meta, overwrite=True)


def _load_state(path: Path, model: nn.Module, names: dict[int, str], trainable: list[nn.Parameter],
                optimizer: torch.optim.Optimizer, scheduler, cfg: DistillConfig) -> tuple[int, list[dict]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:
        raise DistillStateError(f"{path} is not a readable distill-state file: {exc}") from None
    if meta.get("format") != _FORMAT:
        raise DistillStateError(f"{path} is not a qdiff distill-state file")
    saved_cfg, current_cfg = json.loads(meta["config"]), _config_dict(cfg)
    diffs = [f"{k}: checkpoint has {saved_cfg.get(k)!r}, current {current_cfg.get(k)!r}"
             for k in sorted(set(saved_cfg) | set(current_cfg)) if saved_cfg.get(k) != current_cfg.get(k)]
    if diffs:
        raise DistillStateError(f"{path} was made with another distill config: " + "; ".join(diffs))
    order = [names[id(p)] for p in trainable]
    if json.loads(meta["param_order"]) != order:
        raise DistillStateError(f"{path} holds other trainable parameters than this model (another quant config?)")
    iteration = int(meta["iteration"])
    if iteration > cfg.iterations:
        raise DistillStateError(f"{path} is at iteration {iteration}, beyond distill.iterations={cfg.iterations}")
    with torch.no_grad():
        for param in trainable:
            saved = tensors[f"param.{names[id(param)]}"]
            if saved.shape != param.shape:
                raise DistillStateError(f"{path}: {names[id(param)]} has shape {tuple(saved.shape)}, model {tuple(param.shape)}")
            param.copy_(saved)
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    scheduler.load_state_dict(json.loads(meta["scheduler"]))
    return iteration, json.loads(meta["history"])
