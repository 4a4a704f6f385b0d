"""cuBLASLt's workspace: with none, its GEMMs (FP8 `torch._scaled_mm` and bf16 `F.linear` alike) run statically
scheduled kernels instead of the dynamically scheduled ones that need a zeroed counter, so no memset precedes each
GEMM. On an H100 (torch 2.11, CUDA 13) one STDiT block's eight FP8 GEMMs at M = 32768 ran 1.5–5% faster that way,
without their eight memsets; the bf16 GEMMs did not change measurably (docs/benchmarks.md, session 16).

The setting is process-wide. torch ≥ 2.13 sets it at run time (`torch.backends.cuda.cublaslt_workspace_size`: GEMMs
launched or captured afterwards use it); older torch reads the CUBLASLT_WORKSPACE_SIZE environment variable (KiB) once,
at its first cuBLASLt GEMM, so there it must be set before that.
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def drop_cublaslt_workspace() -> str:
    """Give cuBLASLt no workspace for the GEMMs from now on (see the module docstring). Returns how: "run time"
    (torch's setter), "environment" (CUBLASLT_WORKSPACE_SIZE=0, effective if no cuBLASLt GEMM ran yet in this
    process) or "kept" (CUBLASLT_WORKSPACE_SIZE already asks for another size: the user's choice wins)."""
    chosen = os.environ.get("CUBLASLT_WORKSPACE_SIZE")
    if chosen not in (None, "0"):
        log.warning("CUBLASLT_WORKSPACE_SIZE=%s is set: cuBLASLt keeps that workspace", chosen)
        return "kept"
    setter = getattr(torch.backends.cuda, "cublaslt_workspace_size", None)
    if setter is not None:
        try:
            setter(0)
            return "run time"
        except (AttributeError, RuntimeError):  # a build without the binding (CPU-only torch): the environment
            pass
    os.environ["CUBLASLT_WORKSPACE_SIZE"] = "0"
    if torch.cuda.is_initialized():
        log.warning("CUDA is already initialised: CUBLASLT_WORKSPACE_SIZE=0 only applies if no cuBLASLt GEMM ran yet "
                    "(torch %s reads it once)", torch.__version__)
    return "environment"
