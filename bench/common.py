"""What the GPU benchmarks share: CUDA-event timing, the random STDiT-XL/2 and its inputs, the run environment,
releasing GPU memory between variants, and the result files of the step benchmarks (StepLog)."""
from __future__ import annotations

import gc
import json
import platform
import statistics
import time
from pathlib import Path

import torch


# compile_blocks' options of the `--fast` steps: Triton temporal and cross-attention, activation quantization fused
FAST_KERNELS = dict(temporal_attention="short_triton", cross_attention="triton", int_act_quant="fused")


def default_anchor() -> str:
    """The anchor script the step benches compare against: ../shared/bench/anchor_block_stack.py beside the
    checkout, or the copy in .devcarry/ (git-ignored, carried to the device machine, which has no ../shared)."""
    repo = Path(__file__).resolve().parents[1]
    candidates = [repo.parent / "shared/bench/anchor_block_stack.py", repo / ".devcarry/anchor_block_stack.py"]
    return str(next((path for path in candidates if path.is_file()), candidates[0]))


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


def release() -> None:
    """Drop compiled graphs (and their memory) and cached GPU blocks: between the variants of a benchmark."""
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


class StepLog:
    """A step benchmark's `results` (with "steps" and "errors"), written to out_dir/<stem>.json and <stem>.md
    (markdown(results)) by save(); `run_errors` are this run's errors, which replace the same ones of a merged run."""

    def __init__(self, results: dict, out_dir: Path, stem: str, markdown):
        self.results, self.out_dir, self.stem, self.markdown = results, out_dir, stem, markdown
        self.run_errors: list[str] = []

    def save(self) -> None:
        results, run_errors = self.results, self.run_errors
        results["errors"] = [e for e in results["errors"] if e not in run_errors] + run_errors
        clean = json.loads(json.dumps(results, default=str))
        (self.out_dir / f"{self.stem}.json").write_text(json.dumps(clean, indent=1))
        (self.out_dir / f"{self.stem}.md").write_text(self.markdown(clean))

    def fail(self, label: str, exc: Exception) -> None:
        """Print the error and record it as the row `label` and as an error of this run."""
        print(f"{label}: FAILED {exc!r}", flush=True)
        self.results["steps"][label] = {"error": repr(exc)[:300]}
        self.run_errors.append(f"{label}: {exc!r}"[:600])

    def finish(self, started: float) -> int:
        """The last save, with the run's wall seconds since `started`; prints the markdown and returns the exit status
        (1 when this run had errors)."""
        self.results["wall_s"] = time.time() - started
        self.save()
        print((self.out_dir / f"{self.stem}.md").read_text())
        return 0 if not self.run_errors else 1


def attention_table(rows: list[dict]) -> list[str]:
    """Markdown lines of an attention benchmark's variants: device ms (CUDA graph), GB/s, eager event ms and the
    error against float32, or the error message of a variant that failed (bench_short_attention,
    bench_cross_attention)."""
    lines = ["| variant | device ms (CUDA graph) | GB/s | events ms (eager, host included) | max abs error vs fp32 |",
             "|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['variant']} | error: {row['error']} | | | |")
            continue
        lines.append(f"| {row['variant']} | {row['ms']:.3f} | {row['gbps']:.0f} | {row['events_ms']:.3f} | "
                     f"{row['max_abs_error']:.1e} |")
    return lines


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # the attention benches' --dtype


def time_attention_variants(variants, inputs: tuple, reference: torch.Tensor, bytes_moved: int,
                            iters: int) -> list[dict]:
    """One row per (label, fn) of `variants`, fn(*inputs) -> output like `reference` (or (codes, per-row scale),
    compared dequantized): max |error| vs `reference`, device ms of one CUDA graph (`do_bench_cudagraph`), eager
    CUDA-event ms and GB/s for `bytes_moved`; a variant that raises gets its error and the rest go on
    (bench_short_attention, bench_cross_attention)."""
    import triton.testing

    rows = []
    for label, fn in variants:
        row = {"variant": label}
        try:
            with torch.no_grad():
                out = fn(*inputs)  # compiles / JIT-builds outside the timed region and the graph capture
                if isinstance(out, tuple):  # e4m3 codes and per-token scales
                    out = (out[0].float() * out[1]).reshape(reference.shape)
                torch.cuda.synchronize()
                row["max_abs_error"] = float((out.float() - reference).abs().max())
                del out
                row["ms"] = float(triton.testing.do_bench_cudagraph(lambda: fn(*inputs), rep=200))
                row["events_ms"] = cuda_time(lambda: fn(*inputs), iters, 5)
            row["gbps"] = bytes_moved / row["ms"] / 1e6
            print(f"{label}: {row['ms']:.3f} ms ({row['gbps']:.0f} GB/s), events {row['events_ms']:.3f} ms, "
                  f"max abs error {row['max_abs_error']:.1e}", flush=True)
        except Exception as exc:  # noqa: BLE001 - report and go on with the rest
            row["error"] = repr(exc)[:300]
            print(f"{label}: FAILED {exc!r}", flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def write_attention_report(out: str, results: dict, markdown) -> int:
    """Write markdown(results) to `out` and the JSON beside it (.json), print the markdown; exit code 0 unless a
    variant other than a forced SDPA backend failed."""
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(markdown(results))
    out_path.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    print(markdown(results))
    return 0 if all("error" not in row for row in results["rows"] if not row["variant"].startswith("sdpa ")) else 1
