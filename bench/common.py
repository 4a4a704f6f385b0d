"""What the GPU benchmarks share: CUDA-event timing, the random STDiT-XL/2 and its inputs, the run environment."""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch


def cuda_time(fn, iters: int, warmup: int) -> float:
    """Median milliseconds of fn() over `iters` runs, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def build_model(dtype):
    from t2v.models.stdit import STDiT_XL_2

    with torch.device("meta"):
        model = STDiT_XL_2(input_size=(16, 64, 64))
    model = model.to_empty(device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, device="cuda", generator=gen) * 0.02)
        model.y_embedder.y_embedding.normal_(0, 0.02, generator=gen)
        model.pos_embed.copy_(model.spatial_pos_embed())
        model.pos_embed_temporal.copy_(model.temporal_pos_embed())
    return model.to(dtype).eval()


def inputs(dtype, batch=2):
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(batch, 4, 16, 64, 64, device="cuda", generator=gen, dtype=torch.float32).to(dtype)
    t = torch.tensor([999, 999][:batch], device="cuda")
    y = (torch.randn(batch, 1, 120, 4096, device="cuda", generator=gen) * 0.1).to(dtype)
    mask = torch.ones(batch, 120, dtype=torch.long, device="cuda")
    mask[:, 40:] = 0  # a typical prompt: 40 valid tokens
    return x, t, y, mask


def environment() -> dict:
    """Device, versions and date, recorded with every result."""
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d")}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def print_and_save(results: dict, out: str | None) -> None:
    """Print the results as JSON and, with `out`, write them there too."""
    text = json.dumps(results, indent=1, default=str)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
