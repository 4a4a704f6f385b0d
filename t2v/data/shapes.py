"""Procedural captioned videos: one coloured shape moving over a plain background, from a small grammar.

Caption grammar (every caption has 9 words):

    a <colour> <shape> moving <left|right|up|down> on a <background> background
    a <colour> <shape> standing still on a <background> background

colour ∈ COLOURS (6), shape ∈ SHAPES (3), motion ∈ MOTIONS (5, "static" is "standing still"),
background ∈ BACKGROUNDS (3): 270 captions. Size (half-extent 4-6.5 px), travel distance (10-14 px over the
clip), start position and speed are random and not in the caption.

Held-out split: a (colour, shape, motion) combination is held out when (colour + 2·shape + motion) % 5 == 0
(indices into COLOURS, SHAPES, MOTIONS): exactly one motion per (colour, shape) pair, 18 of the 90
combinations, all backgrounds. Every colour, shape and motion, and every pair of them, is still seen in
training (tests check this), so held-out captions test composition, not new words.

Videos are rendered with torch ops on any device: [B, 3, T, H, W] float32 in [-1, 1], T = 16, H = W = 32 by
default. Shapes are anti-aliased (pixel coverage = clamp(0.5 − signed distance, 0, 1)). Every random draw
comes from the `torch.Generator` passed in, so a batch is a pure function of (generator seed, device).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

COLOURS = {  # object colours, RGB in [0, 1]; pairwise distance >= 1, distance to every background >= 0.87
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("left", "right", "up", "down", "static")
MOTION_DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "static": (0, 0)}  # (dx, dy)
BACKGROUNDS = {"black": (0.0, 0.0, 0.0), "white": (1.0, 1.0, 1.0), "gray": (0.5, 0.5, 0.5)}
SPLITS = ("train", "heldout", "all")
ATTRIBUTES = ("colour", "shape", "motion", "background")


@dataclass(frozen=True)
class ShapesSpec:
    """Video size and the ranges of the uncaptioned random factors (pixels; positions are pixel-centre based)."""

    num_frames: int = 16
    height: int = 32
    width: int = 32
    min_size: float = 4.0  # half-extent: circle radius, square half-side, triangle half-width/half-height
    max_size: float = 6.5
    min_travel: float = 10.0  # centre displacement from the first to the last frame
    max_travel: float = 14.0
    margin: float = 1.0  # free pixels between the shape's box and the frame edge, at every frame

    def __post_init__(self):
        room = min(self.height, self.width) - 2 * (self.max_size + self.margin)
        if room < self.max_travel:
            raise ValueError(f"ShapesSpec: a {self.height}x{self.width} frame has {room:.1f} px of travel room for "
                             f"a shape of half-extent {self.max_size}, less than max_travel={self.max_travel}")


# ---- the grammar -------------------------------------------------------------------------------------

def caption(colour: str, shape: str, motion: str, background: str) -> str:
    """The caption of one attribute combination (names from COLOURS, SHAPES, MOTIONS, BACKGROUNDS)."""
    action = "standing still" if motion == "static" else f"moving {motion}"
    return f"a {colour} {shape} {action} on a {background} background"


# word positions [start, stop) of each factor in every caption (`caption`): "a <colour> <shape> moving <dir> on a
# <background> background" or "a <colour> <shape> standing still on a <background> background"
FACTOR_WORD_SLICES = {"colour": (1, 2), "shape": (2, 3), "motion": (3, 5), "background": (7, 8)}

_CAPTION = re.compile(r"^a (\w+) (\w+) (?:moving (\w+)|(standing still)) on a (\w+) background$")


def parse(text: str) -> dict[str, str]:
    """Caption -> dict(colour, shape, motion, background); ValueError naming the caption if it is not in the grammar."""
    found = _CAPTION.match(" ".join(text.lower().split()))
    if found is None:
        raise ValueError(f"caption {text!r} is not in the shapes grammar: expected "
                         "'a <colour> <shape> moving <left|right|up|down> on a <background> background' "
                         "or 'a <colour> <shape> standing still on a <background> background'")
    colour, shape, motion, still, background = found.groups()
    attrs = {"colour": colour, "shape": shape, "motion": "static" if still else motion, "background": background}
    for key, allowed in (("colour", COLOURS), ("shape", SHAPES), ("motion", MOTIONS), ("background", BACKGROUNDS)):
        if attrs[key] not in allowed:
            raise ValueError(f"caption {text!r}: unknown {key} {attrs[key]!r}; expected one of {list(allowed)}")
    return attrs


def vocabulary() -> list[str]:
    """Every word the grammar uses, in a fixed order (the word-level tokenizer's vocabulary)."""
    words = ["a", "moving", "standing", "still", "on", "background"]
    words += list(COLOURS) + list(SHAPES) + [m for m in MOTIONS if m != "static"] + list(BACKGROUNDS)
    return words


def is_heldout(colour: int, shape: int, motion: int) -> bool:
    """Whether the (colour, shape, motion) combination (indices) is held out of training (see module docstring)."""
    return (colour + 2 * shape + motion) % 5 == 0


def caption_index(colour, shape, motion, background):
    """Flat index of a combination in `all_captions()` order (ints or int tensors): colour-major, background last."""
    return ((colour * len(SHAPES) + shape) * len(MOTIONS) + motion) * len(BACKGROUNDS) + background


def _combinations():
    for c in range(len(COLOURS)):
        for s in range(len(SHAPES)):
            for m in range(len(MOTIONS)):
                for b in range(len(BACKGROUNDS)):
                    yield c, s, m, b


def all_captions(split: str = "all") -> list[str]:
    """The captions of a split ("train", "heldout" or "all"), in `caption_index` order."""
    captions = all_caption_list()
    return [captions[caption_index(*combo)] for combo in _split_combinations(split)]


def all_caption_list() -> list[str]:
    """All 270 captions; entry i is the caption of combination i (`caption_index`)."""
    names = (list(COLOURS), SHAPES, MOTIONS, list(BACKGROUNDS))
    return [caption(*(n[i] for n, i in zip(names, combo))) for combo in _combinations()]


def _split_combinations(split: str) -> list[tuple[int, int, int, int]]:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    if split == "all":
        return list(_combinations())
    want_heldout = split == "heldout"
    return [combo for combo in _combinations() if is_heldout(*combo[:3]) == want_heldout]


def heldout_prompts() -> list[str]:
    """One caption per held-out (colour, shape, motion) combination (18), backgrounds cycling black, white, gray."""
    backgrounds = list(BACKGROUNDS)
    names = (list(COLOURS), SHAPES, MOTIONS)
    combos = sorted({combo[:3] for combo in _split_combinations("heldout")})
    return [caption(*(n[i] for n, i in zip(names, combo)), backgrounds[j % len(backgrounds)])
            for j, combo in enumerate(combos)]


def train_prompts() -> list[str]:
    """18 training captions, one per (colour, shape) pair, cycling through the pair's training motions and the
    backgrounds: the seen-caption counterpart of `heldout_prompts`."""
    backgrounds = list(BACKGROUNDS)
    prompts = []
    for j, (c, s) in enumerate((c, s) for c in range(len(COLOURS)) for s in range(len(SHAPES))):
        motions = [m for m in range(len(MOTIONS)) if not is_heldout(c, s, m)]
        prompts.append(caption(list(COLOURS)[c], SHAPES[s], MOTIONS[motions[j % len(motions)]],
                               backgrounds[(j + 1) % len(backgrounds)]))
    return prompts


def split_caption_indices(split: str) -> torch.Tensor:
    """int64 [N]: the `caption_index` of every combination in the split."""
    return torch.tensor([caption_index(*combo) for combo in _split_combinations(split)], dtype=torch.int64)


@functools.lru_cache(maxsize=None)
def _device_table(name: str, device: str) -> torch.Tensor:
    """A constant table on `device`, made once: a host-to-device copy of a small Python list blocks the host until
    the device is idle, which would stop the trainer from queuing the next step while this one runs."""
    if name.startswith("split:"):
        return split_caption_indices(name[len("split:"):]).to(device)
    values = {"directions": MOTION_DIRECTIONS, "palette": COLOURS, "backgrounds": BACKGROUNDS}[name]
    return torch.tensor(list(values.values()), dtype=torch.float32, device=device)


def attributes_of_index(index: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inverse of `caption_index`: int64 [B] -> dict(colour, shape, motion, background) of int64 [B]."""
    index, background = index.div(len(BACKGROUNDS), rounding_mode="floor"), index % len(BACKGROUNDS)
    index, motion = index.div(len(MOTIONS), rounding_mode="floor"), index % len(MOTIONS)
    colour, shape = index.div(len(SHAPES), rounding_mode="floor"), index % len(SHAPES)
    return {"colour": colour, "shape": shape, "motion": motion, "background": background}


# ---- rendering ---------------------------------------------------------------------------------------

def _uniform(n: int, low: float, high, generator: torch.Generator, device) -> torch.Tensor:
    """float32 [n] uniform in [low, high) (high may be a tensor [n])."""
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def sample_layout(caption_ids: torch.Tensor, spec: ShapesSpec, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random size, travel and start centre for each caption: float32 [B] tensors size, travel, x0, y0.

    The start is drawn so that the shape's box stays `margin` px inside the frame along the whole path.
    """
    n, device = caption_ids.shape[0], caption_ids.device
    motion = attributes_of_index(caption_ids)["motion"]
    directions = _device_table("directions", str(device))[motion]  # [B, 2]
    size = _uniform(n, spec.min_size, spec.max_size, generator, device)
    travel = _uniform(n, spec.min_travel, spec.max_travel, generator, device)
    travel = torch.where(directions.abs().sum(1) > 0, travel, torch.zeros_like(travel))
    starts = []
    for axis, extent in ((0, spec.width), (1, spec.height)):
        lo = size + spec.margin  # lowest centre coordinate that keeps the box inside
        hi = extent - size - spec.margin
        step = directions[:, axis] * travel  # signed displacement along this axis
        low_start = torch.maximum(lo, lo - step)  # the end point lo + ... must also stay inside
        high_start = torch.minimum(hi, hi - step)
        starts.append(low_start + (high_start - low_start) * torch.rand(n, generator=generator, device=device))
    return {"size": size, "travel": travel, "x0": starts[0], "y0": starts[1],
            "dx": directions[:, 0], "dy": directions[:, 1]}


def render(caption_ids: torch.Tensor, layout: dict[str, torch.Tensor], spec: ShapesSpec) -> torch.Tensor:
    """Draw the videos: caption_ids int64 [B], layout from `sample_layout` -> float32 [B, 3, T, H, W] in [-1, 1]."""
    device = caption_ids.device
    attrs = attributes_of_index(caption_ids)
    frames = torch.arange(spec.num_frames, dtype=torch.float32, device=device) / max(spec.num_frames - 1, 1)  # [T]
    cx = layout["x0"][:, None] + layout["dx"][:, None] * layout["travel"][:, None] * frames  # [B, T]
    cy = layout["y0"][:, None] + layout["dy"][:, None] * layout["travel"][:, None] * frames
    xs = torch.arange(spec.width, dtype=torch.float32, device=device) + 0.5  # pixel centres
    ys = torch.arange(spec.height, dtype=torch.float32, device=device) + 0.5
    dx = xs[None, None, None, :] - cx[:, :, None, None]  # [B, T, 1, W]
    dy = ys[None, None, :, None] - cy[:, :, None, None]  # [B, T, H, 1]
    size = layout["size"][:, None, None, None]  # [B, 1, 1, 1]
    # signed distance (pixels, negative inside) of each shape, [B, T, H, W]
    circle = torch.sqrt(dx**2 + dy**2) - size
    square = torch.maximum(dx.abs(), dy.abs()) - size
    # isosceles triangle pointing up: apex (0, -size), base corners (±size, +size)
    triangle = torch.maximum((2 * dx.abs() - dy - size) / 5**0.5, dy - size)
    shape = attrs["shape"][:, None, None, None]
    distance = torch.where(shape == 0, circle, torch.where(shape == 1, square, triangle))
    coverage = (0.5 - distance).clamp(0, 1)[:, None]  # [B, 1, T, H, W]
    palette = _device_table("palette", str(device))
    backgrounds = _device_table("backgrounds", str(device))
    fg = palette[attrs["colour"]][:, :, None, None, None]  # [B, 3, 1, 1, 1]
    bg = backgrounds[attrs["background"]][:, :, None, None, None]
    return (bg + (fg - bg) * coverage) * 2 - 1


def sample_caption_ids(batch_size: int, split: str, generator: torch.Generator, device="cpu") -> torch.Tensor:
    """int64 [B]: captions of `split` drawn uniformly with replacement."""
    pool = _device_table(f"split:{split}", str(torch.device(device)))
    return pool[torch.randint(len(pool), (batch_size,), generator=generator, device=device)]


def sample_batch(batch_size: int, generator: torch.Generator, split: str = "train", spec: ShapesSpec = ShapesSpec(),
                 device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch: (videos float32 [B, 3, T, H, W] in [-1, 1], caption_ids int64 [B] into `all_caption_list()`).

    `generator` must live on `device`; the batch depends only on its state (and the device's RNG kernels).
    """
    caption_ids = sample_caption_ids(batch_size, split, generator, device)
    return render(caption_ids, sample_layout(caption_ids, spec, generator), spec), caption_ids


def render_caption(text: str, seed: int = 0, spec: ShapesSpec = ShapesSpec(), device="cpu") -> torch.Tensor:
    """One ground-truth video for a caption, random layout from `seed`: float32 [3, T, H, W] in [-1, 1]."""
    names = (list(COLOURS), list(SHAPES), list(MOTIONS), list(BACKGROUNDS))
    attrs = parse(text)
    index = caption_index(*(n.index(attrs[key]) for n, key in zip(names, ATTRIBUTES)))
    caption_ids = torch.tensor([index], device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    return render(caption_ids, sample_layout(caption_ids, spec, generator), spec)[0]
