"""Procedural checker: does a video show the colour, shape and motion its shapes-grammar caption names?

    parse_caption("a red circle moving left on a black background")
        -> {"colour": "red", "shape": "circle", "motion": "left", "background": "black"}
    check_video(video, caption) -> {"colour": bool, "shape": bool, "motion": bool, "all": bool}

`video` is uint8 [T, H, W, 3] (what the pipeline's video writer gets) or float [3, T, H, W] in [-1, 1]
(what the pipeline decodes), a torch tensor or a numpy array.

How (all from the pixels, colours in [0, 1]):
1. background = per-channel median over all pixels of all frames (the shape covers < 20% of the frame);
2. object mask = pixels farther than `OBJECT_DISTANCE` from the background colour that have at least
   `MIN_NEIGHBOURS` of their 8 neighbours in the mask too (drops speckle, keeps the triangle's thin apex,
   which a morphological opening would cut); a frame counts if its mask has >= `MIN_PIXELS`;
3. colour = nearest `shapes.COLOURS` entry to the median colour of the strongly-off-background mask pixels;
4. shape = nearest prototype in (fill ratio of the bounding box, taper), medians over frames, where taper =
   (mean row width of the box's bottom third − that of its top third) / box width: square (1, 0),
   circle (π/4, 0), triangle (0.55, 0.67) (the triangle points up; blur and video coding move the fill ratio
   but hardly the taper);
5. motion = least-squares centroid displacement from the first to the last frame: < `STATIC_PIXELS` is
   "static", otherwise the dominant axis and its sign (image y grows downwards).
A video where fewer than half the frames show an object fails every key.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from t2v.data import shapes

OBJECT_DISTANCE = 0.3  # RGB distance (0..sqrt(3)) from the background that marks a pixel as object
CORE_DISTANCE = 0.6  # object pixels at least this far from the background give the colour
MIN_NEIGHBOURS = 2  # of the 8 around a pixel, for it to stay in the object mask
MIN_PIXELS = 6  # a frame shows an object if its cleaned mask has at least this many pixels
STATIC_PIXELS = 4.0  # centroid displacement over the clip below which the motion is "static" (moving: 10-14 px)
SHAPE_PROTOTYPES = {"square": (1.0, 0.0), "circle": (math.pi / 4, 0.0), "triangle": (0.55, 0.67)}  # (fill, taper)
KEYS = ("colour", "shape", "motion", "all")


def parse_caption(caption: str) -> dict:
    """Caption -> dict(colour, shape, motion, background); ValueError naming the caption if outside the grammar."""
    return shapes.parse(caption)


def to_rgb_video(video) -> torch.Tensor:
    """uint8 [T, H, W, 3] or float [3, T, H, W] in [-1, 1] (torch or numpy) -> float32 [T, H, W, 3] in [0, 1]."""
    video = torch.as_tensor(np.asarray(video)) if not isinstance(video, torch.Tensor) else video.detach().cpu()
    if video.dtype == torch.uint8:
        if video.dim() != 4 or video.shape[-1] != 3:
            raise ValueError(f"uint8 video must be [T, H, W, 3], got {list(video.shape)}")
        return video.float() / 255
    if not video.is_floating_point() or video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"video must be uint8 [T, H, W, 3] or float [3, T, H, W] in [-1, 1], got "
                         f"{video.dtype} {list(video.shape)}")
    return ((video.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0)  # [3, T, H, W] -> [T, H, W, 3]


def analyse(video) -> dict:
    """Measurements of one video (see the module docstring): dict with
    background [3], colour [3] or None, fill and taper (medians over frames, or None), displacement (dx, dy) px
    or None, frames_with_object (int), num_frames (int)."""
    rgb = to_rgb_video(video)  # [T, H, W, 3]
    num_frames, height, width, _ = rgb.shape
    background = rgb.reshape(-1, 3).median(dim=0).values  # [3]
    distance = (rgb - background).norm(dim=-1)  # [T, H, W]
    raw = (distance > OBJECT_DISTANCE).float()[:, None]  # [T, 1, H, W]
    neighbours = F.avg_pool2d(raw, 3, stride=1, padding=1, count_include_pad=True) * 9 - raw  # of 8, [T, 1, H, W]
    mask = ((raw > 0.5) & (neighbours > MIN_NEIGHBOURS - 0.5))[:, 0]  # bool [T, H, W]
    counts = mask.sum(dim=(1, 2)).float()  # [T]
    weights = mask.float() / counts.clamp(min=1)[:, None, None]
    rows = torch.arange(height, dtype=torch.float32)
    cols = torch.arange(width, dtype=torch.float32)
    cx = (weights.sum(1) * cols).sum(1)  # [T] centroid x
    cy = (weights.sum(2) * rows).sum(1)  # [T] centroid y
    row_any, col_any = mask.any(2).float(), mask.any(1).float()  # [T, H], [T, W]
    y0, y1 = _first(row_any), height - 1 - _first(row_any.flip(1))  # [T] bounding box rows
    x0, x1 = _first(col_any), width - 1 - _first(col_any.flip(1))
    box_h, box_w = y1 - y0 + 1, x1 - x0 + 1
    # taper: mean row width over the box's bottom third minus over its top third, over the box width
    widths = torch.cat([torch.zeros(num_frames, 1), mask.sum(2).float().cumsum(1)], dim=1)  # [T, H + 1] prefix sums
    third = (box_h / 3).floor().clamp(min=1)
    taper = (_range_sum(widths, y1 + 1 - third, y1 + 1) - _range_sum(widths, y0, y0 + third)) / third / box_w
    present = counts >= MIN_PIXELS
    frames = torch.nonzero(present)[:, 0].tolist()
    centroids = torch.stack([cx, cy], 1)[present]  # [N, 2] (x, y)
    fills = (counts / (box_h * box_w))[present]
    tapers = taper[present]
    result = {"background": background, "colour": None, "fill": None, "taper": None, "displacement": None,
              "frames_with_object": len(frames), "num_frames": num_frames}
    if len(frames) < max(2, num_frames / 2):
        return result
    core = mask & (distance > CORE_DISTANCE)
    pixels = rgb[core] if int(core.sum()) > 0 else rgb[mask]
    result["colour"] = pixels.median(dim=0).values
    result["fill"] = float(fills.median())
    result["taper"] = float(tapers.median())
    # least-squares line through the centroids over time; displacement = slope · (T - 1)
    t = torch.tensor(frames, dtype=torch.float32)
    t_centered = t - t.mean()
    slope = (t_centered[:, None] * (centroids - centroids.mean(0))).sum(0) / (t_centered**2).sum()
    result["displacement"] = tuple(float(v) for v in slope * (num_frames - 1))
    return result


def _range_sum(prefix: torch.Tensor, start: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    """prefix sums [T, N + 1], start/stop float [T] -> per-row sum of entries [start, stop) as float [T]."""
    return prefix.gather(1, stop.long()[:, None])[:, 0] - prefix.gather(1, start.long()[:, None])[:, 0]


def _first(flags: torch.Tensor) -> torch.Tensor:
    """flags float [T, N] of 0/1 -> float [T]: index of the first 1 in each row (0 for an all-zero row)."""
    return flags.argmax(dim=1).float()


def classify(measurements: dict) -> dict | None:
    """Measurements from `analyse` -> dict(colour, shape, motion) names, or None if no object was found."""
    if measurements["colour"] is None:
        return None
    palette = torch.tensor(list(shapes.COLOURS.values()))
    colour = list(shapes.COLOURS)[int((palette - measurements["colour"]).norm(dim=1).argmin())]
    feature = (measurements["fill"], measurements["taper"])
    shape = min(SHAPE_PROTOTYPES, key=lambda s: math.dist(feature, SHAPE_PROTOTYPES[s]))
    dx, dy = measurements["displacement"]
    if math.hypot(dx, dy) < STATIC_PIXELS:
        motion = "static"
    elif abs(dx) >= abs(dy):
        motion = "right" if dx > 0 else "left"
    else:
        motion = "down" if dy > 0 else "up"
    return {"colour": colour, "shape": shape, "motion": motion}


def check_video(video, caption: str) -> dict[str, bool]:
    """Whether the video shows the caption's colour, shape and motion: dict(colour, shape, motion, all) of bools."""
    expected = parse_caption(caption)
    found = classify(analyse(video))
    if found is None:
        return {key: False for key in KEYS}
    result = {key: found[key] == expected[key] for key in ("colour", "shape", "motion")}
    result["all"] = all(result.values())
    return result
