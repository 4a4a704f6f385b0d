"""Run VBench on generated video folders (the `vbench` package, imported only here and only when called).

    results = evaluate_runs({"fp": "logs/q/fp", "w4a6_qvdit": "logs/q/w4a6_qvdit/videos"}, prompt_by_index,
                            "logs/vbench", dimensions)        # -> {run name: {dimension: score}}

Each run's .mp4 files are linked into `<output>/staged/<run>/` under VBench's names ('<prompt>-<k>.mp4',
`vbench_table.staged_names`): VBench reads the prompt from the name, and our folders also hold PNG
contact sheets, which VBench would score as one-frame videos. VBench then writes
`<output>/<run>_eval_results.json`; a run whose file exists is not evaluated again unless `overwrite`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from t2v.eval.vbench_table import parse_results, results_path, split_dimensions, staged_names

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "VBench is not installed. Install it in an environment with a CUDA torch: `pip install vbench` (it pins "
    "transformers==4.33.2 and numpy<2, so a separate virtual environment is best; pip install detectron2 too for "
    "the object dimensions). Its model weights (CLIP ViT-B/32 and ViT-L/14 with the LAION aesthetic head, MUSIQ, "
    "AMT-S, RAFT, DINO ViT-B/16, ViCLIP, Tag2Text) are downloaded on first use into $VBENCH_CACHE_DIR (default "
    "~/.cache/vbench). Offline: copy that folder from a machine that downloaded them and pass --local."
)


class VBenchMissingError(ImportError):
    """The vbench package is not importable; the message says how to install it and where its weights go."""


def import_vbench():
    """-> the `vbench.VBench` class; VBenchMissingError (with INSTALL_HINT) when the package is missing."""
    try:
        from vbench import VBench
    except ImportError as exc:
        raise VBenchMissingError(f"{INSTALL_HINT} (import failed: {exc})") from None
    return VBench


def default_full_info() -> Path | None:
    """The prompt-suite file shipped with vbench (VBench_full_info.json), or None."""
    try:
        import vbench
    except ImportError:
        return None
    path = Path(vbench.__file__).parent / "VBench_full_info.json"
    return path if path.is_file() else None


def stage_videos(video_dir, prompt_by_index: dict[int, str], staged_dir) -> Path:
    """Link (or copy, where links fail) every .mp4 of `video_dir` into `staged_dir` under VBench's names.
    `staged_dir` is this module's own folder: it is emptied first."""
    video_dir, staged_dir = Path(video_dir), Path(staged_dir)
    videos = sorted(p.name for p in video_dir.glob("*.mp4"))
    if not videos:
        raise FileNotFoundError(f"no .mp4 videos in {video_dir}")
    if staged_dir.exists():
        shutil.rmtree(staged_dir)
    staged_dir.mkdir(parents=True)
    for source, target in staged_names(videos, prompt_by_index).items():
        try:
            os.symlink((video_dir / source).resolve(), staged_dir / target)
        except OSError:
            shutil.copy2(video_dir / source, staged_dir / target)
    return staged_dir


def evaluate_runs(runs: dict[str, str], prompt_by_index: dict[int, str], output_path, dimensions, *,
                  mode: str = "custom_input", full_info=None, device: str = "cuda", local: bool = False,
                  overwrite: bool = False) -> dict[str, dict[str, float]]:
    """VBench every run (name -> video folder) on `dimensions` -> {name: {dimension: score in [0, 1]}}.

    mode: 'custom_input' (any prompts; the dimensions that need VBench's prompt suite are skipped with a
        warning) or 'vbench_standard' (videos of VBench's own prompts, `full_info` = its VBench_full_info.json).
    """
    output_path = Path(output_path)
    scored, skipped = split_dimensions(dimensions, mode)
    if skipped:
        log.warning("VBench cannot score %s on custom prompts (they need its prompt suite: --mode vbench_standard)",
                    ", ".join(skipped))
    todo = [name for name in runs if overwrite or not results_path(output_path, name).is_file()]
    if todo and scored:
        VBench = import_vbench()
        info = full_info or default_full_info()
        if mode == "vbench_standard" and (info is None or not Path(info).is_file()):
            raise FileNotFoundError(f"--mode vbench_standard needs VBench_full_info.json (got {info}): "
                                    "pass --full_info")
        bench = VBench(device, str(info or ""), str(output_path))
        for name in todo:
            staged = stage_videos(runs[name], prompt_by_index, output_path / "staged" / name)
            log.info("VBench %s on %s (%s)", name, staged, ", ".join(scored))
            bench.evaluate(videos_path=str(staged), name=name, dimension_list=scored, local=local, mode=mode)
    results = {}
    for name in runs:
        path = results_path(output_path, name)
        results[name] = parse_results(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else {}
    return results
