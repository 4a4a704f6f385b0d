"""Train the tiny text-to-video model (docs/tiny_model.md) on procedural shape videos generated on the fly.

Recipe (OpenSora v1.0's, scaled down): STDiT in pixel space (3 channels, learned sigma -> 6 output channels),
a small T5 encoder over the grammar's words trained jointly, IDDPM `training_losses` over the 1000-step linear
schedule (timesteps uniform), caption dropout to the DiT's null embedding with probability
`class_dropout_prob` (classifier-free guidance), AdamW with linear warmup then constant lr, gradient clipping,
an EMA of all weights, bf16 autocast on CUDA.

Outputs in `outdir`:
    model.safetensors        EMA weights in fp16 + metadata (configs, vocabulary, recipe, seed, step); the shipped file
    train_state.safetensors  fp32 weights, EMA, AdamW moments, RNG states, log (for --resume; not to be committed)
    train_log.json           config, per-interval losses and throughput, eval of held-out captions
    loss_curve.png           training loss (log scale), drawn with PIL
    eval_samples.png         (when eval_prompts > 0) sampled held-out videos, one row per caption
Every file is written atomically (temp + rename), at every `ckpt_every` steps and at the end.

Randomness: the data comes from its own generator (seed), the timesteps, noise and caption dropout from the
global torch RNG (seed + 1); both states are checkpointed, so resuming continues the same sequence.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from qdiff.io import atomic_path, save_safetensors_atomic
from t2v.data import shapes
from t2v.models.stdit import TEMPORAL_POS, set_attention
from t2v.models.tiny_t2v import (TinyT2V, load_tiny_state_dict, read_tiny_metadata, save_tiny_t2v,
                                 tiny_state_dict)
from t2v.schedulers.iddpm import IDDPM, PREDICTIONS

STATE_NAME = "train_state.safetensors"
MODEL_NAME = "model.safetensors"
LOG_NAME = "train_log.json"
CURVE_NAME = "loss_curve.png"
SAMPLES_NAME = "eval_samples.png"
STATE_KEY = "train_state"
LOSS_WEIGHTINGS = ("none", "min_snr")
LR_SCHEDULES = ("constant", "cosine")
COMPILE_SCOPES = ("blocks", "loss")  # what --compile compiles
COMPILE_MODES = ("default", "reduce-overhead")  # torch.compile modes; reduce-overhead = CUDA graphs
ATTENTION_CORES = ("sdpa", "math")  # `t2v.models.stdit.set_attention`
MAX_SKIPPED_STEPS = 100  # non-finite updates tolerated over a run before it stops
# TrainConfig fields that define the model and data: a resumed run must use the values it was started with.
ARCHITECTURE_FIELDS = ("hidden_size", "depth", "num_heads", "mlp_ratio", "patch_size", "text_d_model", "text_layers",
                       "text_heads", "text_d_ff", "model_max_length", "num_frames", "image_size", "split",
                       "class_dropout_prob", "temporal_pos", "prediction")


@dataclass(frozen=True)
class TrainConfig:
    # model
    hidden_size: int = field(default=256, metadata={"help": "STDiT hidden size C"})
    depth: int = field(default=6, metadata={"help": "STDiT blocks"})
    num_heads: int = field(default=4, metadata={"help": "attention heads (head dim = C / heads)"})
    mlp_ratio: float = field(default=4.0, metadata={"help": "MLP hidden / C"})
    patch_size: tuple = field(default=(1, 4, 4), metadata={"help": "STDiT patch (t,h,w), e.g. 1,4,4"})
    text_d_model: int = field(default=128, metadata={"help": "text encoder width = caption channels"})
    text_layers: int = field(default=2, metadata={"help": "text encoder layers"})
    text_heads: int = field(default=4, metadata={"help": "text encoder heads"})
    text_d_ff: int = field(default=256, metadata={"help": "text encoder gated-GELU FFN width"})
    model_max_length: int = field(default=12, metadata={"help": "text tokens L (captions have 9 words + end)"})
    class_dropout_prob: float = field(default=0.1, metadata={"help": "caption dropout (CFG training)"})
    temporal_pos: str = field(default="first_block", metadata={
        "help": "where the temporal sin-cos table enters (STDiT temporal_pos): first_block (OpenSora v1.0: the "
                "first block's temporal attention only), every_block, or input (added to the token embeddings "
                "with the spatial table)"})
    # data
    num_frames: int = field(default=16, metadata={"help": "frames T"})
    image_size: int = field(default=32, metadata={"help": "frame height = width, pixels"})
    split: str = field(default="train", metadata={"help": "caption split to train on: train (default) or all"})
    # optimisation
    steps: int = field(default=100_000, metadata={"help": "stop after this many steps (total, across resumes)"})
    max_minutes: float = field(default=0.0, metadata={"help": "stop and save after this many minutes; 0 = none"})
    batch_size: int = field(default=128, metadata={"help": "videos per step"})
    lr: float = field(default=3e-4, metadata={"help": "AdamW peak learning rate"})
    warmup_steps: int = field(default=250, metadata={"help": "linear lr warmup steps"})
    lr_schedule: str = field(default="constant", metadata={
        "help": "after the warmup: constant (as OpenSora) or cosine (down to lr * lr_final_ratio at --steps; a "
                "time-boxed run should set --steps to what fits its minutes)"})
    lr_final_ratio: float = field(default=0.1, metadata={"help": "cosine: the last step's lr as a share of lr"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (OpenSora: 0)"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip (OpenSora: 1.0)"})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay (warmed up as min(d, (1+s)/(10+s)))"})
    prediction: str = field(default="eps", metadata={
        "help": "what the DiT predicts: eps (OpenSora) or v = sqrt(ab)·eps − sqrt(1−ab)·x0, which at high noise is "
                "about −x0, so the layout is learned directly instead of as a tiny correction to x_t"})
    loss_weighting: str = field(default="none", metadata={
        "help": "weight of the prediction's MSE per timestep: none (OpenSora) or min_snr (min(SNR, gamma)/SNR for "
                "eps, /(SNR + 1) for v; with v it nearly mutes the high-noise steps, where motion is decided: use "
                "--x0_weight_floor 1 with it, docs/tiny_model.md session 13)"})
    min_snr_gamma: float = field(default=5.0, metadata={"help": "gamma of min_snr weighting"})
    x0_weight_floor: float = field(default=0.0, metadata={
        "help": "raise the eps-MSE weight w of each sample to at least floor/SNR, i.e. give every timestep an "
                "x0-space weight (w·SNR) of at least this floor; at high noise the plain eps MSE weighs the x0 "
                "error by SNR ≈ 0, so the clip's layout and motion direction get no gradient. 0 = off"})
    x0_weight_floor_final: float = field(default=-1.0, metadata={
        "help": "anneal the floor along a cosine from --x0_weight_floor (after the warmup) to this value at --steps: "
                "the layout and motion first, the shapes' detail later (docs/tiny_model.md session 14); "
                "-1 = a constant floor"})
    high_t_fraction: float = field(default=0.0, metadata={
        "help": "fraction of each batch whose timesteps are drawn from [high_t_start, 1000) instead of [0, 1000) "
                "(more updates where the layout and motion are decided); 0 = uniform, as OpenSora"})
    high_t_start: int = field(default=500, metadata={"help": "lowest timestep of the high_t_fraction draws"})
    clamp_variance: bool = field(default=True, metadata={
        "help": "clamp the variance output to [-1, 1] in the VLB term (unclamped, as OpenSora, it drifted and "
                "overflowed after ~10k steps)"})
    seed: int = field(default=0, metadata={"help": "seed of init, data and noise"})
    init_from: str = field(default="", metadata={
        "help": "start from the weights of a model.safetensors written by this script (same architecture); "
                "fresh optimizer, warmup again; the file's step count is carried into `steps_before`"})
    # run
    device: str = field(default="", metadata={"help": "cuda or cpu (default: cuda when available)"})
    amp: bool = field(default=True, metadata={"help": "bf16 autocast on CUDA (ignored on CPU)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile (what: --compile_scope)"})
    compile_scope: str = field(default="loss", metadata={
        "help": "with --compile: loss (the text encoder, the DiT and the IDDPM loss as one compiled function: 13.8 "
                "steps/s on an H100, host 72 ms and GPU 60 ms per step) or blocks (each STDiT block, as the shipped "
                "model was trained: host-bound, 7.8 steps/s in session 8; docs/benchmarks.md)"})
    compile_mode: str = field(default="default", metadata={
        "help": "with --compile: torch.compile mode; reduce-overhead replays the compiled forward and backward as "
                "CUDA graphs (one launch each instead of one per kernel; CPU runs ignore it): 30.7 steps/s at batch "
                "128 on an H100 against 16.0 in the default mode, which is host-bound there (session 13)"})
    attention: str = field(default="sdpa", metadata={
        "help": "attention of every block while training: sdpa (fused kernels) or math (matmul, float32 softmax, "
                "matmul; faster for the tiny model's short sequences under --compile, docs/tiny_model.md)"})
    word_dropout: float = field(default=0.0, metadata={
        "help": "hide each caption factor's words (colour, shape, motion, background) from the text encoder and "
                "the DiT with this probability, per video and factor: the model learns each word's effect apart"})
    ckpt_every: int = field(default=500, metadata={"help": "save every N steps"})
    log_every: int = field(default=50, metadata={"help": "log every N steps"})
    eval_prompts: int = field(default=18, metadata={"help": "held-out captions checked at the end; 0 = none"})
    eval_steps: int = field(default=100, metadata={"help": "IDDPM steps of the final eval sampling"})
    eval_cfg_scale: float = field(default=4.0, metadata={"help": "CFG scale of the final eval sampling"})

    def __post_init__(self):
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting: expected one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}")
        if self.split not in ("train", "all"):
            raise ValueError(f"split: expected 'train' or 'all', got {self.split!r}")
        if len(self.patch_size) != 3 or any(int(p) <= 0 for p in self.patch_size):
            raise ValueError(f"patch_size: expected three positive ints, got {self.patch_size!r}")
        sizes = (self.num_frames, self.image_size, self.image_size)
        if any(n % int(p) for n, p in zip(sizes, self.patch_size)):
            raise ValueError(f"patch_size {self.patch_size} must divide (num_frames, image_size, image_size) = "
                             f"({self.num_frames}, {self.image_size}, {self.image_size})")
        if self.compile_scope not in COMPILE_SCOPES:
            raise ValueError(f"compile_scope: expected one of {COMPILE_SCOPES}, got {self.compile_scope!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule: expected one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0.0 <= self.lr_final_ratio <= 1.0:
            raise ValueError(f"lr_final_ratio: expected a share in [0, 1], got {self.lr_final_ratio!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode: expected one of {COMPILE_MODES}, got {self.compile_mode!r}")
        if self.temporal_pos not in TEMPORAL_POS:
            raise ValueError(f"temporal_pos: expected one of {TEMPORAL_POS}, got {self.temporal_pos!r}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction: expected one of {PREDICTIONS}, got {self.prediction!r}")
        if self.x0_weight_floor < 0:
            raise ValueError(f"x0_weight_floor must be >= 0, got {self.x0_weight_floor}")
        if self.x0_weight_floor_final < 0 and self.x0_weight_floor_final != -1.0:
            raise ValueError(f"x0_weight_floor_final must be >= 0 (or -1: constant), got {self.x0_weight_floor_final}")
        if self.attention not in ATTENTION_CORES:
            raise ValueError(f"attention: expected one of {ATTENTION_CORES}, got {self.attention!r}")
        if not 0.0 <= self.word_dropout < 1.0:
            raise ValueError(f"word_dropout must be in [0, 1), got {self.word_dropout}")
        if not 0.0 <= self.high_t_fraction <= 1.0:
            raise ValueError(f"high_t_fraction must be in [0, 1], got {self.high_t_fraction}")
        if not 0 <= self.high_t_start < 1000:
            raise ValueError(f"high_t_start must be in [0, 1000), got {self.high_t_start}")
        for name in ("steps", "batch_size", "ckpt_every", "log_every", "eval_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def spec(self) -> shapes.ShapesSpec:
        return shapes.ShapesSpec(num_frames=self.num_frames, height=self.image_size, width=self.image_size)

    def dit_config(self) -> dict:
        return dict(input_size=(self.num_frames, self.image_size, self.image_size), in_channels=3,
                    patch_size=tuple(self.patch_size), hidden_size=self.hidden_size, depth=self.depth,
                    num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, class_dropout_prob=self.class_dropout_prob,
                    pred_sigma=True, caption_channels=self.text_d_model, model_max_length=self.model_max_length,
                    **({"temporal_pos": self.temporal_pos} if self.temporal_pos != "first_block" else {}))

    def text_config(self) -> dict:
        return dict(d_model=self.text_d_model, num_layers=self.text_layers, num_heads=self.text_heads,
                    d_ff=self.text_d_ff)


def init_dit_weights(dit: nn.Module) -> None:
    """OpenSora v1.0's STDiT initialisation: Xavier-uniform linears with zero bias, Xavier patch embedding,
    N(0, 0.02) timestep and caption MLPs, and zero output projections of the cross- and temporal attention
    and of the final layer (so every block starts as the identity on its residual branches)."""
    for module in dit.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    weight = dit.x_embedder.proj.weight
    nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
    for linear in (dit.t_embedder.mlp[0], dit.t_embedder.mlp[2], dit.t_block[1], dit.y_embedder.y_proj.fc1,
                   dit.y_embedder.y_proj.fc2):
        nn.init.normal_(linear.weight, std=0.02)
    for block in dit.blocks:
        for linear in (block.cross_attn.proj, block.attn_temp.proj):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
    nn.init.zeros_(dit.final_layer.linear.weight)
    nn.init.zeros_(dit.final_layer.linear.bias)


def build_tiny_model(cfg: TrainConfig) -> TinyT2V:
    """A freshly initialised TinyT2V (seeded by cfg.seed, without touching the caller's RNG state)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        module = TinyT2V(cfg.dit_config(), cfg.text_config(), shapes.vocabulary(), prediction=cfg.prediction)
        init_dit_weights(module.dit)
    set_attention(module.dit, cfg.attention)
    return module


def caption_token_table(module: TinyT2V, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and masks of every grammar caption, int64 [270, L] each, in `shapes.all_caption_list()` order."""
    tokens = module.tokenize(shapes.all_caption_list())
    return tokens["input_ids"].to(device), tokens["attention_mask"].to(device)


# ---- state: save / resume -------------------------------------------------------------------------

@dataclass
class TrainState:
    cfg: TrainConfig
    module: TinyT2V
    ema: TinyT2V
    optimizer: torch.optim.Optimizer
    data_generator: torch.Generator
    step: int = 0
    log: list = field(default_factory=list)  # one dict per logging interval
    train_seconds: float = 0.0  # wall time spent in training steps, over all runs
    steps_before: int = 0  # steps that trained the `init_from` weights
    skipped_steps: int = 0  # steps whose update was skipped for a non-finite loss or gradient (counted in `step`)


def load_init_weights(cfg: TrainConfig, module: TinyT2V) -> int:
    """Load `cfg.init_from` (a shipped model.safetensors) into `module`; returns the steps that trained it
    (its own `step` plus its `steps_before`). ValueError naming the differing settings if its architecture,
    text encoder or vocabulary is not `cfg`'s."""
    info = read_tiny_metadata(cfg.init_from)
    mine = json.loads(json.dumps(module.metadata()))
    # The temporal table's placement adds no weights: a model may be continued with it switched on.
    def weights_shape(key, value):
        return {k: v for k, v in value.items() if k != "temporal_pos"} if key == "dit_config" else value
    changed = [key for key in ("dit_config", "text_config", "vocabulary")
               if weights_shape(key, info.get(key) or {}) != weights_shape(key, mine[key])]
    if changed:
        details = "; ".join(f"{k}: file {info.get(k)!r}, now {mine[k]!r}" for k in changed)
        raise ValueError(f"--init_from {cfg.init_from}: another architecture ({details})")
    with safe_open(cfg.init_from, framework="pt") as f:
        load_tiny_state_dict(module, {k: f.get_tensor(k).float() for k in f.keys()})
    return int(info.get("step", 0)) + int(info.get("steps_before", 0))


def new_state(cfg: TrainConfig, device: torch.device) -> TrainState:
    module = build_tiny_model(cfg)
    steps_before = load_init_weights(cfg, module) if cfg.init_from else 0
    module = module.to(device)
    ema = copy.deepcopy(module).requires_grad_(False).eval()
    # fused: one kernel per step, and it honours `found_inf` (train_step skips bad updates without a host sync)
    optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=cfg.weight_decay, fused=True)
    data_generator = torch.Generator(device=device).manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed + 1)  # timesteps, noise, caption dropout
    return TrainState(cfg, module, ema, optimizer, data_generator, steps_before=steps_before)


def _rng_tensors(state: TrainState, device: torch.device) -> dict[str, torch.Tensor]:
    tensors = {"rng.data": state.data_generator.get_state(), "rng.cpu": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    return tensors


def save_train_state(state: TrainState, path: Path) -> None:
    """Weights, EMA, AdamW state (by parameter name), RNG states, step and log: one fp32 safetensors file."""
    device = next(state.module.parameters()).device
    tensors = {f"model.{k}": v for k, v in tiny_state_dict(state.module).items()}
    tensors.update({f"ema.{k}": v for k, v in tiny_state_dict(state.ema).items()})
    for name, param in state.module.named_parameters():
        for key, value in state.optimizer.state.get(param, {}).items():
            tensors[f"optim.{name}.{key}"] = value.detach().clone().reshape(value.shape)
    tensors.update(_rng_tensors(state, device))
    meta = {"config": dataclasses.asdict(state.cfg), "step": state.step, "log": state.log,
            "train_seconds": state.train_seconds, "steps_before": state.steps_before,
            "skipped_steps": state.skipped_steps}
    save_safetensors_atomic(tensors, path, metadata={"format": "pt", STATE_KEY: json.dumps(meta)}, overwrite=True)


def load_train_state(cfg: TrainConfig, path: Path, device: torch.device) -> TrainState:
    """Rebuild the state saved by `save_train_state`; the architecture fields of `cfg` must equal the saved ones."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})[STATE_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    saved = meta["config"]
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    saved = {k: saved.get(k, json.loads(json.dumps(defaults[k]))) for k in ARCHITECTURE_FIELDS}
    changed = [f"{k}: saved {saved[k]!r}, now {getattr(cfg, k)!r}" for k in ARCHITECTURE_FIELDS
               if json.loads(json.dumps(getattr(cfg, k))) != saved[k]]
    if changed:
        raise ValueError(f"cannot resume from {path}: the model/data settings differ ({'; '.join(changed)})")
    state = new_state(dataclasses.replace(cfg, init_from=""), device)  # the weights come from the file below
    state.cfg = cfg
    for prefix, target in (("model.", state.module), ("ema.", state.ema)):
        load_tiny_state_dict(target, {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)})
    for name, param in state.module.named_parameters():
        entries = {k.removeprefix(f"optim.{name}."): v for k, v in tensors.items() if k.startswith(f"optim.{name}.")
                   and "." not in k.removeprefix(f"optim.{name}.")}
        if entries:
            # AdamW keeps `step` on the CPU unless fused/capturable; match where a fresh step would put it
            state.optimizer.state[param] = {
                k: v.to(param.device if (k != "step" or state.optimizer.defaults.get("fused")) else "cpu")
                for k, v in entries.items()}
    state.data_generator.set_state(tensors["rng.data"])
    torch.set_rng_state(tensors["rng.cpu"])
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    state.step, state.log, state.train_seconds = meta["step"], meta["log"], meta["train_seconds"]
    state.steps_before, state.skipped_steps = meta.get("steps_before", 0), meta.get("skipped_steps", 0)
    return state


# ---- one step ---------------------------------------------------------------------------------------

def _cosine(cfg: TrainConfig, step: int, start: float, end: float) -> float:
    """From `start` (until the warmup ends) along a cosine to `end` at step `steps`."""
    progress = min(1.0, max(0, step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1))
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup over `warmup_steps`, then constant (OpenSora trains at a constant lr) or a cosine from lr down
    to lr·lr_final_ratio at step `steps`."""
    warm = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    if cfg.lr_schedule == "constant" or step < cfg.warmup_steps:
        return warm
    return _cosine(cfg, step, cfg.lr, cfg.lr * cfg.lr_final_ratio)


def x0_floor_at(cfg: TrainConfig, step: int) -> float:
    """The x0 weight floor κ of step `step`: `x0_weight_floor`, or with `x0_weight_floor_final` ≥ 0 a cosine from
    it to that value (constant during the warmup)."""
    if cfg.x0_weight_floor_final < 0:
        return cfg.x0_weight_floor
    return _cosine(cfg, step, cfg.x0_weight_floor, cfg.x0_weight_floor_final)


@torch.no_grad()
def update_ema(ema: nn.Module, module: nn.Module, decay: float, keep: torch.Tensor | None = None) -> None:
    """ema ← decay·ema + (1 − decay)·module, parameter by parameter (buffers are fixed tables, left alone).

    keep: optional 0-dim float tensor on the parameters' device, 1 to update and 0 to leave the EMA as it is;
    a tensor rather than a bool so that the caller need not wait for the device to decide."""
    ema_params = list(ema.parameters())
    params = [p.detach() for p in module.parameters()]
    if keep is None:
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        return
    steps = torch._foreach_sub(params, ema_params)
    torch._foreach_mul_(steps, keep * (1.0 - decay))
    torch._foreach_add_(ema_params, steps)


def drop_caption_words(mask: torch.Tensor, probability: float) -> torch.Tensor:
    """Word dropout: mask [B, L] of grammar captions -> a copy in which each factor's words
    (`shapes.FACTOR_WORD_SLICES`) are masked out with `probability`, independently per video and factor (global
    RNG). Slices, not index lists: no host-to-device copy."""
    kept = mask.clone()
    for start, stop in shapes.FACTOR_WORD_SLICES.values():
        hidden = torch.rand(mask.shape[0], device=mask.device) < probability  # [B]
        kept[:, start:stop] = kept[:, start:stop].masked_fill(hidden[:, None], 0)
    return kept


def sample_timesteps(cfg: TrainConfig, num_steps: int, device) -> torch.Tensor:
    """int64 [B] training timesteps from the global RNG: uniform on [0, num_steps), except that the first
    round(high_t_fraction·B) rows are uniform on [high_t_start, num_steps)."""
    index = torch.randint(0, num_steps, (cfg.batch_size,), device=device)
    n_high = round(cfg.high_t_fraction * cfg.batch_size)
    if n_high:
        index[:n_high] = torch.randint(cfg.high_t_start, num_steps, (n_high,), device=device)
    return index


def mse_weights(cfg: TrainConfig, diffusion: IDDPM, index: torch.Tensor, floor: float | None = None) -> torch.Tensor:
    """float32 [B]: the weight of each sample's MSE (of ε or of v, `cfg.prediction`), chosen in x0 space.

    An x0 error e is an ε error √SNR_t·e and a v error √(SNR_t+1)·e, so the MSE of the prediction weighs the
    x0 MSE by k_t = SNR_t (ε) or SNR_t + 1 (v), with SNR_t = ᾱ_t/(1 − ᾱ_t); k_t → 0 at high noise for ε.
    "none": w = 1 (the plain MSE, OpenSora). "min_snr" (Hang et al. 2023): w = min(SNR_t, γ)/k_t, which damps the
    easy low-noise steps. Then, with `x0_weight_floor` κ > 0, w = max(w, κ/k_t): every timestep's x0 weight w·k_t
    is at least κ (`floor`, default `x0_weight_floor`; `x0_floor_at` anneals it). The VLB (variance) term is left
    unweighted."""
    alpha_bar = diffusion.schedule.alphas_cumprod.to(index.device, torch.float32)[index]
    snr = alpha_bar / (1 - alpha_bar)
    x0_per_unit = snr if cfg.prediction == "eps" else snr + 1
    weights = torch.ones(index.shape, device=index.device)
    if cfg.loss_weighting == "min_snr":
        weights = snr.clamp(max=cfg.min_snr_gamma) / x0_per_unit
    floor = cfg.x0_weight_floor if floor is None else floor
    if floor > 0:
        weights = torch.maximum(weights, floor / x0_per_unit)
    return weights


def batch_loss(cfg: TrainConfig, module: TinyT2V, diffusion: IDDPM, videos: torch.Tensor, index: torch.Tensor,
               ids: torch.Tensor, mask: torch.Tensor,
               weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(optimised loss, mean MSE, mean VLB term) of one batch, 0-dim each: the part of a step that
    `--compile_scope loss` compiles. videos [B, 3, T, H, W], index int64 [B], ids / mask [B, L], weights float32 [B]
    (`mse_weights`: an input rather than computed inside, so that an annealed floor does not recompile)."""
    y = module.encode_text(ids, mask)  # [B, 1, L, C_cap]
    terms = diffusion.training_losses(module.dit, videos, index, model_kwargs={"y": y, "mask": mask},
                                      clamp_variance=cfg.clamp_variance)
    loss = (weights * terms["mse"] + terms["vb"]).mean()
    return loss, terms["mse"].mean(), terms["vb"].mean()


def compile_for_training(cfg: TrainConfig, module: TinyT2V):
    """`--compile`: torch.compile what `cfg.compile_scope` names (in place for blocks); returns the loss function
    for `train_step`. The DiT switches to fixed shapes (padded text with a key mask instead of packed): no host sync
    for the text lengths and no recompile per batch; the same function as the packed path."""
    module.dit.static_block_inputs = True
    if cfg.compile_scope == "loss":
        return torch.compile(batch_loss, mode=cfg.compile_mode)
    for block in module.dit.blocks:
        block.compile(mode=cfg.compile_mode)
    return batch_loss


def train_step(state: TrainState, diffusion: IDDPM, token_ids: torch.Tensor, token_mask: torch.Tensor,
               autocast: bool, loss_fn=batch_loss) -> dict[str, torch.Tensor]:
    """One optimisation step on a fresh batch. Returns 0-dim device tensors: the batch means of loss, mse, vb, the
    grad_norm, and `skipped` (1.0 when the loss or the gradient was not finite, and then the weights, AdamW's
    moments and the EMA were left as they were; the other terms are 0 then).

    The step never waits for the device: the skip is decided on the device (fused AdamW's `found_inf`, a 0/1 weight
    on the EMA update), so the host can queue the next step while this one runs. `state.step` counts every call;
    the caller counts the skips when it reads the terms (`train` does at each log line)."""
    cfg, module = state.cfg, state.module
    device = token_ids.device
    videos, caption_ids = shapes.sample_batch(cfg.batch_size, state.data_generator, cfg.split, cfg.spec(), device)
    ids, mask = token_ids[caption_ids], token_mask[caption_ids]  # [B, L] each
    if cfg.word_dropout > 0:
        mask = drop_caption_words(mask, cfg.word_dropout)
    index = sample_timesteps(cfg, diffusion.num_sampling_steps, device)
    weights = mse_weights(cfg, diffusion, index, x0_floor_at(cfg, state.step))
    for group in state.optimizer.param_groups:
        group["lr"] = lr_at(cfg, state.step)
    module.train()
    if cfg.compile and cfg.compile_mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are consumed: reuse its memory
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        loss, mse, vb = loss_fn(cfg, module, diffusion, videos, index, ids, mask, weights)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
    # A non-finite loss or gradient would turn every weight into NaN: skip that update, decided on the device.
    finite = torch.isfinite(grad_norm) & torch.isfinite(loss)
    state.optimizer.found_inf = (~finite).float()
    state.optimizer.step()
    update_ema(state.ema, module, min(cfg.ema_decay, (1 + state.step) / (10 + state.step)), keep=finite.float())
    state.step += 1
    zero = torch.zeros((), device=device)
    return {"loss": torch.where(finite, loss.detach(), zero),
            "mse": torch.where(finite, mse.detach(), zero), "vb": torch.where(finite, vb.detach(), zero),
            "grad_norm": torch.where(finite, grad_norm.detach(), zero), "skipped": (~finite).float()}


# ---- outputs ----------------------------------------------------------------------------------------

def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def model_metadata(state: TrainState) -> dict:
    cfg = state.cfg
    return {"recipe": dataclasses.asdict(cfg), "seed": cfg.seed, "step": state.step,
            "steps_before": state.steps_before, "skipped_steps": state.skipped_steps,
            "train_seconds": round(state.train_seconds, 1),
            "data": {"generator": "t2v.data.shapes", "spec": dataclasses.asdict(cfg.spec()), "split": cfg.split,
                     "heldout_rule": "(colour + 2*shape + motion) % 5 == 0"},
            "ema_decay": cfg.ema_decay, "weights": "EMA, float16", "git_sha": git_sha(), "torch": torch.__version__}


def draw_loss_curve(log: list[dict], path: Path, width: int = 800, height: int = 400) -> None:
    """PNG of loss and mse per logging interval against step, log10 y axis (PIL only)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 70, width - 20, 30, height - 40
    draw.rectangle([left, top, right, bottom], outline="black")
    points = [(e["step"], e["loss"], e["mse"]) for e in log if e["loss"] > 0 and e["mse"] > 0]
    if points:
        max_step = max(p[0] for p in points)
        values = [math.log10(v) for p in points for v in p[1:]]
        lo, hi = math.floor(min(values) * 4) / 4, math.ceil(max(values) * 4) / 4
        hi = hi if hi > lo else lo + 0.25
        x_of = lambda s: left + (right - left) * s / max(max_step, 1)  # noqa: E731
        y_of = lambda v: bottom - (bottom - top) * (math.log10(v) - lo) / (hi - lo)  # noqa: E731
        for tick in range(int(lo * 4), int(hi * 4) + 1):
            y = y_of(10 ** (tick / 4))
            draw.line([left, y, right, y], fill=(225, 225, 225))
            draw.text((5, y - 6), f"{10 ** (tick / 4):.3g}", fill="black")
        for column, colour in ((1, (200, 30, 30)), (2, (30, 30, 200))):
            line = [(x_of(p[0]), y_of(p[column])) for p in points]
            if len(line) > 1:
                draw.line(line, fill=colour, width=2)
        draw.text((left, bottom + 8), "0", fill="black")
        draw.text((right - 40, bottom + 8), f"{max_step}", fill="black")
    draw.text((left + 10, 8), "training loss (red: the optimised weighted mse + vb, blue: unweighted mse), log scale, "
              "vs step", fill="black")
    with atomic_path(path, overwrite=True) as tmp:
        image.save(tmp, format="PNG")


def write_outputs(state: TrainState, outdir: Path, state_path: Path, extra_log: dict | None = None) -> None:
    """train_state (at state_path), model (EMA fp16), train_log.json, loss curve; each atomic."""
    save_train_state(state, state_path)
    save_tiny_t2v(outdir / MODEL_NAME, state.ema, model_metadata(state))
    log = {"config": dataclasses.asdict(state.cfg), "step": state.step, "train_seconds": round(state.train_seconds, 1),
           "device": _device_name(next(state.module.parameters()).device), "torch": torch.__version__,
           "git_sha": git_sha(), "intervals": state.log, **(extra_log or {})}
    with atomic_path(outdir / LOG_NAME, overwrite=True) as tmp:
        tmp.write_text(json.dumps(log, indent=1))
    draw_loss_curve(state.log, outdir / CURVE_NAME)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# ---- final evaluation -------------------------------------------------------------------------------

@torch.no_grad()
def sample_videos(module: TinyT2V, prompts: list[str], num_steps: int, cfg_scale: float, seed: int,
                  device: torch.device) -> torch.Tensor:
    """IDDPM ancestral sampling with CFG, as the inference pipeline does.

    Returns float32 [B, 3, T, H, W] clamped to [-1, 1] (what the pixel VAE decodes to).
    """
    module.eval()
    tokens = module.tokenize(prompts)
    ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
    y = module.encode_text(ids, mask).float()
    y_null = module.dit.y_embedder.y_embedding[None, None].expand(len(prompts), -1, -1, -1).float()
    generator = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn((len(prompts), 3, *module.dit.input_size), generator=generator, device=device)
    sampler = IDDPM(num_sampling_steps=num_steps, cfg_scale=cfg_scale, prediction=module.prediction)
    out = sampler.sample(module.dit, z, y, mask=mask, y_null=y_null, generator=generator, progress=False)
    return out.float().clamp(-1, 1)


def eval_prompts(count: int) -> dict[str, list[str]]:
    """The first `count` of `shapes.heldout_prompts()` and of `shapes.train_prompts()` (18 each)."""
    return {"heldout": shapes.heldout_prompts()[:count], "train": shapes.train_prompts()[:count]}


def evaluate(module: TinyT2V, cfg: TrainConfig, device: torch.device, outdir: Path | None) -> dict:
    """Sample `eval_prompts` held-out and as many training captions, score them with the procedural checker;
    save the held-out videos as a PNG grid. Returns {"eval": {split: {prompts, accuracy, per_prompt}, ...}}."""
    from t2v.data.checker import check_video

    start = time.time()
    report = {"sampler": "iddpm", "steps": cfg.eval_steps, "cfg_scale": cfg.eval_cfg_scale, "seed": cfg.seed + 2}
    for split, prompts in eval_prompts(cfg.eval_prompts).items():
        videos = sample_videos(module, prompts, cfg.eval_steps, cfg.eval_cfg_scale, cfg.seed + 2, device).cpu()
        results = [check_video(video, prompt) for video, prompt in zip(videos, prompts)]
        accuracy = {key: sum(r[key] for r in results) / len(results) for key in ("colour", "shape", "motion", "all")}
        report[split] = {"prompts": prompts, "accuracy": accuracy, "per_prompt": results}
        if outdir is not None and split == "heldout":
            save_video_grid(videos, outdir / SAMPLES_NAME)
    report["seconds"] = round(time.time() - start, 1)
    return {"eval": report}


def save_video_grid(videos: torch.Tensor, path: Path, every: int = 2) -> None:
    """videos float [B, 3, T, H, W] in [-1, 1] -> PNG, one row per video, every `every`-th frame."""
    import numpy as np
    from PIL import Image

    frames = ((videos[:, :, ::every].clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8)  # [B, 3, T', H, W]
    grid = frames.permute(0, 3, 2, 4, 1).flatten(2, 3).flatten(0, 1)  # [B, 3, T', H, W] -> [B·H, T'·W, 3]
    with atomic_path(path, overwrite=True) as tmp:
        Image.fromarray(np.ascontiguousarray(grid.numpy())).save(tmp, format="PNG")


# ---- the loop ---------------------------------------------------------------------------------------

def train(cfg: TrainConfig, outdir, resume: bool = False, overwrite: bool = False, state_path=None,
          print_fn=print) -> TrainState:
    """Train until `cfg.steps` total steps or `cfg.max_minutes`, saving every `ckpt_every` steps and at the end.

    state_path: where the resumable training state goes (default OUTDIR/train_state.safetensors).
    """
    outdir = Path(outdir)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    state_path = Path(state_path) if state_path else outdir / STATE_NAME
    if state_path.exists() and not (resume or overwrite):
        raise FileExistsError(f"{state_path} exists: pass --resume to continue it or --overwrite to start over")
    if resume and not state_path.exists():
        raise FileNotFoundError(f"--resume: no training state at {state_path}")
    outdir.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    state = load_train_state(cfg, state_path, device) if resume else new_state(cfg, device)
    autocast = cfg.amp and device.type == "cuda"
    # the full process (index = timestep), its arrays on the device: no host-to-device copy per step
    diffusion = IDDPM(num_sampling_steps=1000, prediction=cfg.prediction).to(device)
    token_ids, token_mask = caption_token_table(state.module, device)
    loss_fn = compile_for_training(cfg, state.module) if cfg.compile else batch_loss
    params = sum(p.numel() for p in state.module.parameters())
    dit = state.module.dit
    print_fn(f"tiny t2v: {params / 1e6:.2f}M parameters, {dit.num_temporal}x{dit.num_spatial} tokens"
             f", batch {cfg.batch_size}, device {_device_name(device)}, start step {state.step}")

    run_start = time.time()
    sums, interval_start, interval_steps = None, time.time(), 0
    while state.step < cfg.steps:
        if cfg.max_minutes and time.time() - run_start > cfg.max_minutes * 60:
            print_fn(f"time budget of {cfg.max_minutes} min spent at step {state.step}")
            break
        terms = train_step(state, diffusion, token_ids, token_mask, autocast, loss_fn)
        sums = terms if sums is None else {k: sums[k] + v for k, v in terms.items()}
        interval_steps += 1
        if state.step % cfg.log_every == 0 or state.step == cfg.steps or state.step % cfg.ckpt_every == 0:
            skipped = round(sums.pop("skipped").item())  # syncs the device
            if skipped:
                state.skipped_steps += skipped
                print_fn(f"steps {state.step - interval_steps + 1}-{state.step}: {skipped} update(s) skipped for a "
                         f"non-finite loss or gradient ({state.skipped_steps} in this run's history)")
                if state.skipped_steps > MAX_SKIPPED_STEPS:
                    raise FloatingPointError(
                        f"step {state.step}: more than {MAX_SKIPPED_STEPS} steps with a non-finite loss or gradient; "
                        "lower --lr, or resume from the last checkpoint")
            good_steps = max(interval_steps - skipped, 1)
            means = {k: v.item() / good_steps for k, v in sums.items()}
            seconds = time.time() - interval_start
            state.train_seconds += seconds
            entry = {"step": state.step, **{k: round(v, 6) for k, v in means.items()}, "lr": lr_at(cfg, state.step - 1),
                     "samples_per_s": round(interval_steps * cfg.batch_size / seconds, 1),
                     "elapsed_s": round(time.time() - run_start, 1)}
            state.log.append(entry)
            print_fn(f"step {state.step:6d}  loss {means['loss']:.4f}  mse {means['mse']:.4f}  vb {means['vb']:.4f}  "
                     f"|g| {means['grad_norm']:.2f}  {entry['samples_per_s']:.0f} videos/s  "
                     f"{interval_steps / seconds:.2f} steps/s  {entry['elapsed_s']:.0f}s")
            sums, interval_start, interval_steps = None, time.time(), 0
        if state.step % cfg.ckpt_every == 0:
            write_outputs(state, outdir, state_path)
            interval_start = time.time()  # the checkpoint is not training time
    if interval_steps:
        state.train_seconds += time.time() - interval_start
    extra = {}
    if cfg.eval_prompts > 0:
        extra = evaluate(state.ema, cfg, device, outdir)
        # the raw (non-EMA) weights too: early in training the EMA can lag behind them
        extra["eval_raw_weights"] = evaluate(state.module, cfg, device, None)["eval"]
        for key, name in (("eval", "EMA"), ("eval_raw_weights", "raw")):
            for split in ("heldout", "train"):
                print_fn(f"checker accuracy, {name} weights, {cfg.eval_prompts} {split} captions ({cfg.eval_steps} "
                         f"IDDPM steps, CFG {cfg.eval_cfg_scale}): {extra[key][split]['accuracy']}")
    write_outputs(state, outdir, state_path, extra)
    size_mb = os.path.getsize(outdir / MODEL_NAME) / 1e6
    print_fn(f"saved {outdir / MODEL_NAME} ({size_mb:.1f} MB, step {state.step}) and {state_path}")
    return state
