"""VBench results as the papers' table, and the file naming VBench expects. Pure functions: no vbench import.

The papers (ViDiT-Q Table 1, Q-VDiT) report eight VBench dimensions on OpenSora v1.0, as percentages:

    | Method | W/A | Imaging Quality | Aesthetic Quality | Motion Smooth. | Dynamic Degree | BG. Consist. |
    | Subject Consist. | Scene Consist. | Overall Consist. |

VBench writes `<output_path>/<name>_eval_results.json` = {dimension: [score, [per-video results]]}, scores in
[0, 1] (VBench < 0.1.5 wrote imaging quality on MUSIQ's 0-100 scale; `to_percent` takes both).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from t2v.eval.quality import METHODS
from t2v.eval.quality_report import bit_width

# (VBench dimension, the papers' column header), in the papers' order
PAPER_DIMENSIONS = (
    ("imaging_quality", "Imaging Quality"),
    ("aesthetic_quality", "Aesthetic Quality"),
    ("motion_smoothness", "Motion Smooth."),
    ("dynamic_degree", "Dynamic Degree"),
    ("background_consistency", "BG. Consist."),
    ("subject_consistency", "Subject Consist."),
    ("scene", "Scene Consist."),
    ("overall_consistency", "Overall Consist."),
)
DIMENSION_NAMES = dict(PAPER_DIMENSIONS)
# VBench refuses these in `custom_input` mode: they need the labels of its own prompt suite
# (`VBench.check_dimension_requires_extra_info`).
NEEDS_VBENCH_PROMPTS = frozenset({"object_class", "multiple_objects", "scene", "appearance_style", "color",
                                  "spatial_relationship"})
RESULTS_SUFFIX = "_eval_results.json"
_RUN_NAME = re.compile(r"^(w\d+a\d+)_([a-z0-9]+)$")
_SAMPLE_INDEX = re.compile(r"^sample_(\d+)_")


def results_path(output_path, name: str) -> Path:
    """Where VBench writes run `name`'s results."""
    return Path(output_path) / f"{name}{RESULTS_SUFFIX}"


def parse_results(data: dict) -> dict[str, float]:
    """VBench results {dimension: [score, per-video list]} (or {dimension: score}) -> {dimension: score}."""
    if not isinstance(data, dict):
        raise ValueError(f"VBench results must be a JSON object of dimensions, got {type(data).__name__}")
    scores = {}
    for dimension, value in data.items():
        score = value[0] if isinstance(value, (list, tuple)) and value else value
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise ValueError(f"VBench results: dimension {dimension!r} has no numeric score ({value!r:.80})")
        scores[dimension] = float(score)
    return scores


def to_percent(score: float) -> float:
    """A VBench score as the papers print it: fractions in [0, 1] times 100; larger values are already percent."""
    return score * 100 if abs(score) <= 1 else score


def run_label(name: str, fp_bits: str = "16/16") -> tuple[str, str]:
    """Run name -> (Method, W/A): 'w4a6_qvdit' -> ('Q-VDiT', '4/6'), 'fp' -> ('FP', fp_bits); other names as is."""
    if name.lower() == "fp":
        return "FP", fp_bits
    match = _RUN_NAME.match(name)
    if match and match.group(2) in METHODS:
        return METHODS[match.group(2)], bit_width(match.group(1))
    return name, "-"


def format_vbench_table(rows: list[tuple[str, dict[str, float]]],
                        dimensions: tuple[str, ...] = tuple(DIMENSION_NAMES), fp_bits: str = "16/16") -> str:
    """Markdown table in the papers' layout: one row per (run name, scores), percent with 2 decimals, 'n/a'
    where a run has no score for a dimension; the FP row's W/A is `fp_bits`."""
    headers = [DIMENSION_NAMES.get(d, d) for d in dimensions]
    lines = ["| Method | W/A | " + " | ".join(headers) + " |", "|---|---|" + "---:|" * len(dimensions)]
    for name, scores in rows:
        method, bits = run_label(name, fp_bits)
        cells = []
        for dimension in dimensions:
            score = scores.get(dimension)
            cells.append("n/a" if score is None or math.isnan(score) else f"{to_percent(score):.2f}")
        lines.append(f"| {method} | {bits} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def split_dimensions(dimensions, mode: str) -> tuple[list[str], list[str]]:
    """-> (dimensions VBench can score in `mode`, dimensions it cannot)."""
    if mode == "custom_input":
        return ([d for d in dimensions if d not in NEEDS_VBENCH_PROMPTS],
                [d for d in dimensions if d in NEEDS_VBENCH_PROMPTS])
    return list(dimensions), []


def run_name(video_dir) -> str:
    """A run's name from its video folder: '<run>/videos' -> '<run>', else the folder's own name."""
    path = Path(video_dir).resolve()
    return path.parent.name if path.name == "videos" else path.name


def staged_names(video_names: list[str], prompt_by_index: dict[int, str]) -> dict[str, str]:
    """Our video files ('sample_<index>_<slug>.mp4') -> VBench's names '<prompt>-<k>.mp4', k counting the videos
    of the same prompt (VBench reads the prompt back from the name, in both modes)."""
    staged, counts = {}, {}
    for name in sorted(video_names):
        match = _SAMPLE_INDEX.match(name)
        if not match:
            raise ValueError(f"{name}: not a pipeline video name (sample_<index>_<slug>.mp4); rename it to "
                             "'<prompt>-<k>.mp4' or regenerate it with the pipeline")
        index = int(match.group(1))
        if index not in prompt_by_index:
            raise ValueError(f"{name}: prompt index {index} is not in the prompt list ({len(prompt_by_index)} prompts)")
        prompt = prompt_by_index[index]
        if "/" in prompt or "\0" in prompt or len(f"{prompt}-00.mp4".encode()) > 255:
            raise ValueError(f"prompt {prompt!r} cannot be a file name (VBench reads prompts from file names)")
        k = counts.get(prompt, 0)
        counts[prompt] = k + 1
        staged[name] = f"{prompt}-{k}.mp4"
    return staged
