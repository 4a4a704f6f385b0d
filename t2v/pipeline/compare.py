"""Compare quantized runs with the FP run, video by video (same file names, same seeds).

Per run: the relative latent error ‖z_q − z_fp‖ / ‖z_fp‖ from the `<name>.latent.safetensors` files that
`generate_videos` writes beside every `.mp4` (mean over videos), and the PSNR of the decoded `.mp4`s to
the FP ones (8-bit frames, peak 255) from the MSE pooled over all videos of the run, so one identical
video does not make the whole run infinite (a run identical to FP everywhere gives inf).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from qdiff.io import atomic_path

LATENT_SUFFIX = ".latent.safetensors"


@dataclass
class RunComparison:
    name: str
    num_videos: int
    latent_rel_error: float | None  # mean over videos; None when a run has no latent files
    psnr: float                     # dB, pooled MSE over all videos; inf when identical
    per_video: dict = field(default_factory=dict)  # video name -> {"latent_rel_error", "psnr", "mse"}


def psnr_from_mse(mse: float, peak: float = 255.0) -> float:
    """10·log10(peak² / mse) in dB; inf for mse == 0."""
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def video_mse(video: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean squared error of two uint8 videos [T, H, W, 3] (in 8-bit units)."""
    if video.shape != reference.shape:
        raise ValueError(f"video shapes differ: {tuple(video.shape)} vs reference {tuple(reference.shape)}")
    return float(((video.double() - reference.double()) ** 2).mean())


def psnr(video: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR (dB, peak 255) of uint8 video [T, H, W, 3] to reference; inf when identical."""
    return psnr_from_mse(video_mse(video, reference))


def relative_error(z: torch.Tensor, z_reference: torch.Tensor) -> float:
    """‖z − z_ref‖₂ / ‖z_ref‖₂ over all elements (float64)."""
    if z.shape != z_reference.shape:
        raise ValueError(f"latent shapes differ: {tuple(z.shape)} vs reference {tuple(z_reference.shape)}")
    z, z_reference = z.double(), z_reference.double()
    return float((z - z_reference).norm() / z_reference.norm())


def _load_latent(path: Path) -> torch.Tensor:
    return load_file(str(path))["latent"]


def compare_run(fp_dir, run_dir, name: str | None = None) -> RunComparison:
    """Compare every `.mp4` of `fp_dir` with the same-named file in `run_dir`."""
    from t2v.pipeline.video_io import read_video

    fp_dir, run_dir = Path(fp_dir), Path(run_dir)
    for folder in (fp_dir, run_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"video folder not found: {folder}")
    videos = sorted(p.name for p in fp_dir.glob("*.mp4"))
    if not videos:
        raise FileNotFoundError(f"no .mp4 videos in the FP folder {fp_dir}")
    missing = [v for v in videos if not (run_dir / v).is_file()]
    if missing:
        raise FileNotFoundError(f"{run_dir} lacks {len(missing)} of the FP videos, e.g. {missing[0]} "
                                "(runs must use the same prompts, seeds and file names)")
    per_video, errors, sq_sum, count = {}, [], 0.0, 0
    for video_name in videos:
        stem = video_name[: -len(".mp4")]
        fp_video, q_video = read_video(fp_dir / video_name), read_video(run_dir / video_name)
        mse = video_mse(q_video, fp_video)
        sq_sum, count = sq_sum + mse * fp_video.numel(), count + fp_video.numel()
        entry = {"mse": mse, "psnr": psnr_from_mse(mse), "latent_rel_error": None}
        fp_latent, q_latent = fp_dir / (stem + LATENT_SUFFIX), run_dir / (stem + LATENT_SUFFIX)
        if fp_latent.is_file() and q_latent.is_file():
            entry["latent_rel_error"] = relative_error(_load_latent(q_latent), _load_latent(fp_latent))
            errors.append(entry["latent_rel_error"])
        per_video[stem] = entry
    latent_error = sum(errors) / len(errors) if len(errors) == len(videos) else None
    return RunComparison(name or str(run_dir), len(videos), latent_error, psnr_from_mse(sq_sum / count), per_video)


def compare_runs(fp_dir, run_dirs, names=None) -> list[RunComparison]:
    names = list(names) if names else [None] * len(run_dirs)
    if len(names) != len(run_dirs):
        raise ValueError(f"{len(names)} names for {len(run_dirs)} runs")
    return [compare_run(fp_dir, run_dir, name) for run_dir, name in zip(run_dirs, names)]


def _format_number(value: float | None, digits: int) -> str:
    if value is None:
        return "n/a"
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def format_table(results: list[RunComparison], fp_name: str = "FP") -> str:
    """Markdown table, one row per run."""
    lines = [
        f"| run | videos | rel. latent error vs {fp_name} | PSNR vs {fp_name} (dB) |",
        "|---|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r.name} | {r.num_videos} | {_format_number(r.latent_rel_error, 4)} | "
                     f"{_format_number(r.psnr, 2)} |")
    return "\n".join(lines) + "\n"


def write_table(text: str, path, overwrite: bool = False) -> Path:
    """Atomic write; refuses an existing file unless overwrite."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)
