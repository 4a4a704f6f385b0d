"""Argument handling shared by the sampling scripts (stages 2, 3 and 5)."""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="OpenSora-style .py config, e.g. configs/opensora/tiny.py")
    p.add_argument("--ckpt_path", default=None, help="split STDiT checkpoint (overrides model.from_pretrained)")
    p.add_argument("--outdir", default=None, help="output folder (default: the config's save_dir)")
    p.add_argument("--prompt_path", default=None, help="prompt file, one per line (default: the config's)")
    p.add_argument("--precompute_text_embeds", default=None,
                   help="safetensors file from t2v.scripts.encode_prompts; skips loading the text encoder")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default: the config's)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="DiT dtype (default: the config's)")
    p.add_argument("--num_sampling_steps", type=int, default=None, help="sampling steps (default: the config's)")
    p.add_argument("--num_prompts", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def add_compile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each STDiT block (t2v.models.stdit.compile_blocks): fuses the elementwise "
                        "and layout work and the integer layers' activation quantization; the first step compiles "
                        "(minutes)")
    p.add_argument("--fast", action="store_true",
                   help="the fastest settings measured on an H100 (docs/benchmarks.md, sessions 12-16): --compile "
                        "--cuda_graph --merge_qkv --temporal_attention short_triton --cross_attention triton "
                        "--int_act_quant fused --fast_accum (the last two for --hardware layers) "
                        "--cublaslt_workspace none; flags given "
                        "explicitly win; needs a CUDA GPU")
    p.add_argument("--fast_accum", action=argparse.BooleanOptionalAction, default=None,
                   help="with --hardware FP8 layers: torch._scaled_mm's use_fast_accum, Hopper's FP8 accumulation "
                        "without periodic promotion (W8A8 FP8 step 89.0 -> 82.7 ms on an H100, output error to the "
                        "fake-quant model unchanged at 6.19e-2; default off, on with --fast)")
    p.add_argument("--int_act_quant", choices=("torch", "kernel", "fused"), default=None,
                   help="with --compile and --hardware: how the integer and FP8 layers quantize their inputs. "
                        "torch: plain ops the compiler fuses into their producers (default); kernel: our Triton "
                        "kernel; fused: our Triton kernel with LayerNorm + modulate and GELU inside it and "
                        "approximate division (the fastest, docs/benchmarks.md; a code may move by one step on a tie)")
    p.add_argument("--temporal_attention", choices=("math", "sdpa", "short_triton"), default=None,
                   help="with --compile: the temporal attention's core (t2v.models.stdit.set_temporal_attention). "
                        "math: matmul-softmax-matmul (default); sdpa; short_triton: our Triton kernel for N <= 32 "
                        "frames (6x faster than cuDNN's SDPA on an H100, docs/benchmarks.md)")
    p.add_argument("--cross_attention", choices=("sdpa", "math", "triton"), default=None,
                   help="with --compile: the cross-attention's core (t2v.models.stdit.set_cross_attention). sdpa "
                        "(default); math; triton: our Triton kernel, 0.115 ms per call against 0.143 ms for cuDNN "
                        "on an H100 (docs/benchmarks.md)")
    p.add_argument("--cublaslt_workspace", choices=("default", "none"), default=None,
                   help="none: give cuBLASLt no workspace (qdiff.blas), so its GEMMs run statically scheduled "
                        "kernels with no memset before each (the W8A8 FP8 --fast step's GEMMs 36.6 -> 35.1 ms on "
                        "an H100, two processes); process-wide, set before the first GEMM; default: torch's (none with --fast)")
    p.add_argument("--merge_qkv", action="store_true",
                   help="merge q, k and v of each self-attention into one linear (t2v.models.stdit.merge_qkv): one "
                        "activation quantization and one wider GEMM; attentions whose layers cannot merge (TQE post "
                        "terms, per-layer smoothing, fake quant) stay as they are and are logged")
    p.add_argument("--cuda_graph", action="store_true",
                   help="with --compile on a GPU: replay each DiT call as one CUDA graph (qdiff.cuda_graphs), so "
                        "the host no longer limits the step (W8A8 with --int_act_quant fused: 190 -> 151 ms per "
                        "XL/2 step on an H100); not for models whose quantization changes per timestep")


# speed flags with a default that --fast changes: (default, with --fast)
SPEED_DEFAULTS = {"temporal_attention": ("math", "short_triton"), "cross_attention": ("sdpa", "triton"),
                  "int_act_quant": ("torch", "fused"), "fast_accum": (False, True),
                  "cublaslt_workspace": ("default", "none")}


def resolve_speed_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in the speed flags left unset: their defaults, or with --fast the fastest measured settings (--compile,
    --cuda_graph, --merge_qkv, the Triton temporal and cross attention, fused activation quantization, FP8 fast
    accumulation, no cuBLASLt workspace). Flags given explicitly keep their values. `--cublaslt_workspace none` takes
    effect here, before any GEMM runs (`qdiff.blas`). Returns args."""
    fast = getattr(args, "fast", False)
    for name, (default, fastest) in SPEED_DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, fastest if fast else default)
    if fast:
        args.compile = args.cuda_graph = args.merge_qkv = True
    if getattr(args, "cublaslt_workspace", "default") == "none":
        from qdiff.blas import drop_cublaslt_workspace

        logging.getLogger("t2v").info("--cublaslt_workspace none: set at %s", drop_cublaslt_workspace())
    return args


def compile_if_requested(model, args) -> None:
    """`--fast_accum` on the FP8 layers, `--merge_qkv`, then `--compile`: compile the DiT's blocks in place (float,
    fake-quant and integer models)."""
    if getattr(args, "fast_accum", False):
        from qdiff.lowbit import fp8_layers

        layers = list(fp8_layers(model))
        for _, layer in layers:
            layer.fast_accum = True
        logging.getLogger("t2v").info("--fast_accum: %d FP8 layer(s) accumulate without promotion", len(layers))
    if getattr(args, "merge_qkv", False):
        from t2v.models.stdit import Attention, merge_qkv

        skipped = merge_qkv(model)
        log = logging.getLogger("t2v")
        for name, why in skipped.items():
            log.info("--merge_qkv: %s left unmerged: %s", name, why)
        merged = sum(1 for m in model.modules() if isinstance(m, Attention) and m.qkv is not None)
        log.info("--merge_qkv: q/k/v merged in %d attention(s), %d left unmerged", merged, len(skipped))
    if getattr(args, "compile", False):
        from t2v.models.stdit import compile_blocks

        compile_blocks(model, int_act_quant=getattr(args, "int_act_quant", "torch"),
                       temporal_attention=getattr(args, "temporal_attention", "math"),
                       cross_attention=getattr(args, "cross_attention", None))


def cuda_graph_if_requested(pipe, args) -> None:
    """`--cuda_graph`: the sampler replays the (compiled) DiT as CUDA graphs, one per input signature."""
    if not getattr(args, "cuda_graph", False):
        return
    if not getattr(args, "compile", False):
        raise ValueError("--cuda_graph needs --compile (the compiled DiT takes fixed-shape inputs without host "
                         "synchronisation, which a CUDA graph requires)")
    if pipe.device.type != "cuda":
        raise ValueError(f"--cuda_graph (and --fast) needs a CUDA device; this run is on {pipe.device}")
    from qdiff.api import per_step_layers
    from qdiff.cuda_graphs import CUDAGraphForward

    per_step = per_step_layers(pipe.model)
    if per_step:
        raise ValueError(f"--cuda_graph: {len(per_step)} layer(s) change their quantization per timestep (e.g. "
                         f"{per_step[0][0]}: timestep ranges or per-timestep bits), which a captured graph would "
                         "freeze at one step: run without --cuda_graph")
    pipe.runner = CUDAGraphForward(pipe.model)


@dataclass
class Run:
    cfg: object
    prompts: list
    indices: list
    outdir: Path
    device: str
    is_main: bool


def resolve_run(args) -> Run:
    """Config + CLI overrides, this process's share of the prompts, device."""
    from t2v.pipeline.config import load_inference_config
    from t2v.pipeline.distributed import shard, world
    from t2v.pipeline.text_embeds import read_prompts

    cfg = load_inference_config(args.config)
    changes = {k: getattr(args, k) for k in ("seed", "dtype", "prompt_path") if getattr(args, k) is not None}
    cfg = cfg.replace(**changes)
    if cfg.prompt_path is None:
        raise ValueError("no prompts: pass --prompt_path or set prompt_path in the config")
    prompts = read_prompts(cfg.prompt_path)[: args.num_prompts]
    rank, size = world()
    indices = shard(list(range(len(prompts))), rank, size)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and size > 1:
        device = f"cuda:{rank % torch.cuda.device_count()}"
    outdir = Path(args.outdir or cfg.save_dir)
    return Run(cfg, [prompts[i] for i in indices], indices, outdir, device, rank == 0)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def fail(exc: BaseException) -> int:
    """Print one actionable line (no traceback) and return exit code 2."""
    print(f"error: {exc}", file=sys.stderr)
    return 2
