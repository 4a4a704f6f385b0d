"""Write and read sample videos: .mp4 (H.264 via imageio-ffmpeg) and PNG contact sheets.

Frames come either as the decoder's float video [3, T, H, W] in [-1, 1] or as uint8 [T, H, W, 3].
Every write is atomic (temp file in the destination folder, then `os.replace`) and refuses to replace an
existing file unless `overwrite=True`.
"""
from __future__ import annotations

import math
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch
from PIL import Image

from qdiff.io import atomic_path


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """Video -> uint8 [T, H, W, 3] on the CPU.

    frames: float [3, T, H, W] in [-1, 1] (converted as OpenSora's `save_sample`: clamp to [-1, 1],
    (x + 1)/2, ·255, +0.5, truncate), or already uint8 [T, H, W, 3] (returned as is).
    """
    if frames.dtype == torch.uint8:
        if frames.dim() != 4 or frames.shape[-1] != 3:
            raise ValueError(f"uint8 frames must be [T, H, W, 3], got {tuple(frames.shape)}")
        return frames.cpu()
    if frames.dim() != 4 or frames.shape[0] != 3:
        raise ValueError(f"float frames must be [3, T, H, W], got {tuple(frames.shape)}")
    scaled = (frames.detach().float().clamp(-1, 1) + 1) / 2
    scaled = (scaled * 255 + 0.5).clamp(0, 255)
    return scaled.permute(1, 2, 3, 0).to("cpu", torch.uint8)  # [3, T, H, W] -> [T, H, W, 3]


def _pad_to_even(video: np.ndarray) -> np.ndarray:
    """[T, H, W, 3] -> [T, H', W', 3] with H', W' even (edge rows/columns repeated): yuv420p needs even sizes."""
    pad_h, pad_w = video.shape[1] % 2, video.shape[2] % 2
    if pad_h == 0 and pad_w == 0:
        return video
    return np.pad(video, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def require_video_writer() -> None:
    """Raise a RuntimeError saying what to install if `.mp4` files cannot be written here.

    imageio's FFMPEG plugin needs the imageio-ffmpeg package (which ships an ffmpeg binary). Stages call this
    before they sample, so a missing writer costs seconds, not the sampling run.
    """
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError, OSError) as err:
        raise RuntimeError(
            f"cannot write .mp4 videos: imageio-ffmpeg (and its ffmpeg binary) is not usable here ({err}). "
            "Install it with `pip install imageio-ffmpeg` (it is listed in requirements.txt)."
        ) from None


def save_video(frames: torch.Tensor, path, fps: int = 8, overwrite: bool = False) -> Path:
    """Write frames (see `to_uint8`) to an H.264 .mp4 at `fps`; odd heights/widths are padded by one pixel.

    Raises FileExistsError if `path` exists and not `overwrite`. Returns the path.
    """
    video = _pad_to_even(to_uint8(frames).numpy())
    with atomic_path(path, overwrite=overwrite) as tmp:
        # macro_block_size=1: keep the size as is (imageio would otherwise resize to multiples of 16).
        with imageio.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264", quality=8,
                                pixelformat="yuv420p", macro_block_size=1) as writer:
            for frame in video:
                writer.append_data(frame)
    return Path(path)


def read_video(path) -> torch.Tensor:
    """Decode a video file -> uint8 [T, H, W, 3]."""
    with imageio.get_reader(str(path), format="FFMPEG") as reader:
        frames = [np.asarray(frame) for frame in reader]
    return torch.from_numpy(np.stack(frames))


def save_contact_sheet(frames: torch.Tensor, path, ncols: int = 8, overwrite: bool = False) -> Path:
    """Save all frames (see `to_uint8`) as one PNG grid, ncols frames per row, row-major in time.

    The image is [ceil(T/ncols)·H, min(T, ncols)·W]; unused cells of the last row are black.
    Raises FileExistsError if `path` exists and not `overwrite`. Returns the path.
    """
    video = to_uint8(frames).numpy()
    num_frames, height, width, _ = video.shape
    cols = min(ncols, num_frames)
    rows = math.ceil(num_frames / cols)
    sheet = np.zeros((rows * height, cols * width, 3), dtype=np.uint8)
    for i, frame in enumerate(video):
        row, col = divmod(i, cols)
        sheet[row * height:(row + 1) * height, col * width:(col + 1) * width] = frame
    with atomic_path(path, overwrite=overwrite) as tmp:
        Image.fromarray(sheet).save(tmp, format="PNG")
    return Path(path)
