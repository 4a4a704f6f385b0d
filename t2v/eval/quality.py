"""The quality benchmark: FP vs every quantization method on held-out prompts, in one process.

    settings = BenchSettings(config="configs/opensora/tiny_qvdit.py", outdir=Path("logs/quality/tiny"))
    summary = run_benchmark(settings)      # -> dict; `t2v.eval.quality_report` turns it into the table

What runs (the stages of shell_scripts/run_pipeline.sh through the library, each built once):
1. the FP pipeline (`build_pipeline`), FP videos of the N evaluation prompts (seed + prompt index);
2. calibration data on K calibration prompts (`capture_calib_data`), disjoint from the evaluation prompts
   when both come from the same file (the first K lines calibrate, the next N are evaluated);
3. per run `<bits>_<method>` (a config in configs/quant/): PTQ initialisation + distillation
   (`t2v.pipeline.ptq.calibrate`) on a fresh fp32 model, then the quantized model exactly as stage 5
   builds it (`build_quant_model` on a fresh FP model with the saved quant params), sampled with the same
   seeds, and scored against the FP videos (`t2v.eval.metrics`) and by the caption checker.

Metrics are computed on the decoded 8-bit frames before video encoding, so the codec adds nothing (the
.mp4 files are written for viewing and VBench). Outputs under `outdir`:
    run.json                  what the FP side was made with; a rerun with other settings is refused
    fp/                       FP videos (.mp4, contact-sheet .png, .latent.safetensors) and result.json
    calib_data/               calibration data (stage 3 format)
    <bits>_<method>/          stage-4 outputs (quant_params.safetensors, ...), videos/, result.json
A run whose result.json exists is skipped (resume) unless `overwrite`, which recomputes everything.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qdiff.io import atomic_path
from t2v.eval.metrics import pool_metrics, video_metrics

log = logging.getLogger(__name__)

METHODS = {"ptq": "Naive PTQ", "smoothquant": "SmoothQuant", "quarot": "QuaRot", "viditq": "ViDiT-Q", "qvdit": "Q-VDiT"}
BITS = ("w8a8", "w4a8", "w4a6", "w3a6")
RESULT_NAME = "result.json"
RUN_NAME = "run.json"
FORMAT = "qvdit-quality-benchmark"
# --small: a CI-sized run (seconds on the tiny preset), same code path.
SMALL = dict(num_prompts=2, calib_prompts=1, num_sampling_steps=5, methods=("ptq", "viditq", "qvdit"),
             bits=("w8a8", "w3a6"),
             overrides=("distill.iterations=20", "distill.lr=5e-4", "distill.checkpoint_every=20"))


class BenchmarkError(ValueError):
    """The benchmark cannot run as asked (bad selection, an outdir made with other settings); says what to do."""


@dataclass(frozen=True)
class BenchSettings:
    """Everything a benchmark run depends on.

    config: OpenSora-style .py inference config (model, sampler, prompts). ckpt_path: STDiT checkpoint
    (default: the config's). methods / bits: the runs are every `<bits>_<method>` of `quant_dir`.
    num_prompts: N evaluation prompts; calib_prompts: K calibration prompts. prompt_path /
    calib_prompt_path: prompt files (default: the config's prompt_path for both). num_sampling_steps /
    seed: default the config's. overrides: `KEY=VALUE` quant-config overrides applied to every run
    (e.g. distill.iterations=2000). x_dtype: storage dtype of the calibration latents.
    """
    config: str
    outdir: Path
    ckpt_path: str | None = None
    methods: tuple[str, ...] = tuple(METHODS)
    bits: tuple[str, ...] = BITS
    num_prompts: int = 10
    calib_prompts: int = 10
    prompt_path: str | None = None
    calib_prompt_path: str | None = None
    num_sampling_steps: int | None = None
    seed: int | None = None
    overrides: tuple[str, ...] = ()
    quant_dir: str = "configs/quant"
    device: str | None = None
    x_dtype: str = "bfloat16"
    save_mp4: bool = True
    overwrite: bool = False
    progress: bool = True
    balance_rows: int = 256

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise BenchmarkError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
        if self.num_prompts < 1 or self.calib_prompts < 1:
            raise BenchmarkError("num_prompts and calib_prompts must be at least 1")

    def run_names(self) -> list[str]:
        """`<bits>_<method>` for every selected pair, grouped by bit-width (the papers' row order)."""
        return [f"{bits}_{method}" for bits in self.bits for method in self.methods]


# ------------------------------------------------------------------------------ prompts
def split_prompts(eval_prompts: list[str], calib_prompts: list[str], same_file: bool, num_eval: int,
                  num_calib: int) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """-> (evaluation, calibration) lists of (index in its file, prompt).

    From one file the first `num_calib` lines calibrate and the next `num_eval` are evaluated, so the
    evaluation prompts are held out; from two files, the first lines of each.
    """
    calib = list(enumerate(calib_prompts))[:num_calib]
    start = num_calib if same_file else 0
    evaluation = list(enumerate(eval_prompts))[start:start + num_eval]
    if len(calib) < num_calib:
        raise BenchmarkError(f"{num_calib} calibration prompts asked, the prompt file holds {len(calib_prompts)}")
    if len(evaluation) < num_eval:
        need = num_eval + start
        after = " after the calibration prompts" if same_file else ""
        raise BenchmarkError(f"{num_eval} evaluation prompts asked{after}: the prompt file needs {need} lines, it "
                             f"holds {len(eval_prompts)} (pass fewer, or --calib_prompt_path for a separate "
                             "calibration file)")
    return evaluation, calib


# ------------------------------------------------------------------------------ checker
def load_checker():
    """(check_video, parse_caption) of `t2v.data.checker`, or None when that module is not installed."""
    try:
        from t2v.data.checker import check_video, parse_caption
    except ImportError as exc:
        log.info("caption checker unavailable (%s): checker accuracy is n/a", exc)
        return None
    return check_video, parse_caption


def checker_scores(videos: list[torch.Tensor], prompts: list[str], checker) -> dict:
    """Caption-checker results of uint8 videos [T, H, W, 3]: accuracy = fraction of the checkable prompts
    (those `parse_caption` reads without ValueError) whose video passes `check_video(...)["all"]`; None when
    none is checkable."""
    per_video = [None] * len(videos)
    if checker is not None:
        check_video, parse_caption = checker
        for i, (video, prompt) in enumerate(zip(videos, prompts)):
            try:
                parsed = parse_caption(prompt)
            except ValueError as exc:  # not a caption of the checker's grammar: that prompt is n/a
                log.debug("checker cannot read %r: %s", prompt, exc)
                continue
            if parsed is not None:
                per_video[i] = {key: bool(value) for key, value in check_video(video, prompt).items()}
    checked = [r for r in per_video if r is not None]
    passed = sum(r["all"] for r in checked)
    keys = sorted({key for r in checked for key in r})
    return {
        "accuracy": passed / len(checked) if checked else None,
        "passed": passed,
        "checked": len(checked),
        "per_key": {key: sum(r.get(key, False) for r in checked) / len(checked) for key in keys},
        "per_video": per_video,
    }


# ------------------------------------------------------------------------------ sampling
def sample_videos(pipe, prompts: list[tuple[int, str]], seed: int, outdir: Path, save_mp4: bool,
                  on_step=None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Sample and decode every prompt (batches of the config's batch_size, noise from seed + index) and save
    each as stage 2 does (`<name>.latent.safetensors`, `.png`, `.mp4`). Returns (latents [C, T, h, w] float32
    CPU, videos uint8 [T, H, W, 3]) per prompt."""
    from qdiff.io import save_safetensors_atomic
    from t2v.pipeline.sample import decode, sample_latents, video_name
    from t2v.pipeline.video_io import require_video_writer, save_contact_sheet, save_video, to_uint8

    if save_mp4:
        require_video_writer()
    outdir.mkdir(parents=True, exist_ok=True)
    latents_out, videos_out = [], []
    step = pipe.cfg.batch_size
    for start in range(0, len(prompts), step):
        batch = prompts[start:start + step]
        indices, texts = [i for i, _ in batch], [p for _, p in batch]
        latents = sample_latents(pipe, texts, indices, seed, progress=False, on_step=on_step)
        for (index, prompt), latent in zip(batch, latents):
            name = video_name(index, prompt)
            video = decode(pipe, latent[None])[0]  # one at a time, as `load_videos`: identical FP on resume
            save_safetensors_atomic({"latent": latent.float()}, outdir / f"{name}.latent.safetensors", overwrite=True)
            save_contact_sheet(video, outdir / f"{name}.png", overwrite=True)
            if save_mp4:
                save_video(video, outdir / f"{name}.mp4", fps=pipe.cfg.fps, overwrite=True)
            latents_out.append(latent.float().cpu())
            videos_out.append(to_uint8(video))
    return latents_out, videos_out


def load_videos(pipe, prompts: list[tuple[int, str]], outdir: Path):
    """Latents saved by `sample_videos`, decoded again -> (latents, uint8 videos), or None if any is missing."""
    from safetensors.torch import load_file

    from t2v.pipeline.sample import decode, video_name
    from t2v.pipeline.video_io import to_uint8

    paths = [outdir / f"{video_name(i, p)}.latent.safetensors" for i, p in prompts]
    if not all(path.is_file() for path in paths):
        return None
    latents = [load_file(str(path))["latent"] for path in paths]
    videos = [to_uint8(decode(pipe, latent[None])[0]) for latent in latents]
    return latents, videos


# ------------------------------------------------------------------------------ scoring
def score_run(latents, videos, fp_latents, fp_videos, prompts: list[tuple[int, str]], checker) -> dict:
    """Metrics of one run's videos against FP: pooled fidelity metrics, mean relative latent error,
    checker accuracy; and the same per video."""
    from t2v.pipeline.compare import relative_error
    from t2v.pipeline.sample import video_name

    per_video = [video_metrics(v, ref) for v, ref in zip(videos, fp_videos)]
    latent_errors = [relative_error(z, ref) for z, ref in zip(latents, fp_latents)]
    checks = checker_scores(videos, [p for _, p in prompts], checker)
    for metrics, error, check in zip(per_video, latent_errors, checks.pop("per_video")):
        metrics.update(latent_rel_error=error, checker=check)
    return {
        "metrics": {**pool_metrics(per_video), "latent_rel_error": sum(latent_errors) / len(latent_errors),
                    "checker_accuracy": checks["accuracy"], "checker": checks},
        "per_video": {video_name(i, p): m for (i, p), m in zip(prompts, per_video)},
    }


# ------------------------------------------------------------------------------ the run
def environment(device: torch.device) -> dict:
    """Where and with what the benchmark ran."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        threads = torch.get_num_threads()
        name = f"CPU ({platform.processor() or platform.machine()}, {threads} thread{'s' if threads > 1 else ''})"
    try:
        # "<sha>-dirty" when the checkout has uncommitted changes
        sha = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True, text=True,
                             timeout=10, cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {"device": name, "torch": torch.__version__, "python": platform.python_version(), "git": sha,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _write_json(path: Path, data: dict) -> None:
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(data, indent=1, allow_nan=True) + "\n", encoding="utf-8")


def _plain(data):
    """JSON round trip: tuples -> lists, as a saved file reads back."""
    return json.loads(json.dumps(data))


def _check_run_file(outdir: Path, fingerprint: dict, overwrite: bool) -> None:
    path = outdir / RUN_NAME
    if path.is_file() and not overwrite:
        saved = json.loads(path.read_text(encoding="utf-8"))
        diffs = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
        if diffs:
            raise BenchmarkError(f"{outdir} holds a benchmark made with other settings ({', '.join(diffs)} differ); "
                                 "pass --overwrite to redo it, or choose another --outdir")
    _write_json(path, fingerprint)


def quant_yaml(settings: BenchSettings, name: str) -> Path:
    """`<quant_dir>/<name>.yaml`; BenchmarkError when it does not exist."""
    path = Path(settings.quant_dir) / f"{name}.yaml"
    if not path.is_file():
        raise BenchmarkError(f"no quant config {path} for run {name!r} (the shipped ones are in configs/quant/)")
    return path


def quant_config_for(settings: BenchSettings, name: str, calib_steps: int):
    """The resolved QuantConfig of run `name`: its YAML, calib.n_prompts / n_steps fitted to the captured
    calibration data (n_steps capped at the sampling steps), then the user's overrides."""
    from qdiff.config import QuantConfig, apply_overrides

    qconfig = QuantConfig.from_yaml(quant_yaml(settings, name))
    fitted = [f"calib.n_prompts={settings.calib_prompts}", f"calib.n_steps={min(qconfig.calib.n_steps, calib_steps)}"]
    return apply_overrides(qconfig, fitted + list(settings.overrides))


def finished_runs(settings: BenchSettings, names: list[str], calib_steps: int) -> dict[str, dict]:
    """Results of the runs done before; BenchmarkError if one was made with another quant config."""
    done = {}
    for name in names:
        path = Path(settings.outdir) / name / RESULT_NAME
        if path.is_file():
            result = json.loads(path.read_text(encoding="utf-8"))
            if result.get("quant_config") != _plain(quant_config_for(settings, name, calib_steps).to_dict()):
                raise BenchmarkError(f"{path} was made with another quant config (changed --set or YAML?); "
                                     "pass --overwrite to redo every run, or choose another --outdir")
            done[name] = result
    return done


def quantized_run(settings: BenchSettings, pipe, name: str, calib_dir: Path, evaluation: list[tuple[int, str]],
                  fp_latents: list, fp_videos: list, checker) -> dict:
    """One run `<bits>_<method>`: stage 4 (PTQ init + distillation) on a fresh fp32 model, stage 5 (the quantized
    model as `quant_inference` builds it) on the evaluation prompts with FP's seeds, scored against FP.
    Writes `<outdir>/<name>/result.json` last and returns its content."""
    from t2v.pipeline.build import build_model
    from t2v.pipeline.calib_data import CalibDataset
    from t2v.pipeline.ptq import calibrate
    from t2v.pipeline.quant_model import build_quant_model, quant_step_hook

    cfg, device, run_dir = pipe.cfg, pipe.device, Path(settings.outdir) / name
    steps = int(pipe.sampler.num_sampling_steps)
    qconfig = quant_config_for(settings, name, steps)
    started = time.time()
    model = build_model(cfg, pipe.model_input_size, ckpt_path=settings.ckpt_path, device=device, dtype=torch.float32)
    params = calibrate(model, qconfig, CalibDataset(calib_dir, n_steps=qconfig.calib.n_steps), run_dir,
                       resume=not settings.overwrite, overwrite=settings.overwrite, device=device, progress=False,
                       inference_config=cfg, balance_rows=settings.balance_rows)
    del model
    calib_time, started = time.time() - started, time.time()
    qmodel = build_model(cfg, pipe.model_input_size, ckpt_path=settings.ckpt_path, device=device, dtype=pipe.dtype)
    build_quant_model(qmodel, qconfig, params)
    latents, videos = sample_videos(dataclasses.replace(pipe, model=qmodel), evaluation, cfg.seed, run_dir / "videos",
                                    settings.save_mp4, on_step=quant_step_hook(qmodel, steps))
    del qmodel
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result = score_run(latents, videos, fp_latents, fp_videos, evaluation, checker)
    history = json.loads((run_dir / "distill_history.json").read_text(encoding="utf-8"))
    bits, method = name.split("_", 1)
    result.update(name=name, method=method, method_label=METHODS[method], bits=bits,
                  quant_config=_plain(qconfig.to_dict()), calibration_s=calib_time, sampling_s=time.time() - started,
                  calib_rel_error_ptq=history["ptq_init"]["relative_error"],
                  calib_rel_error=history["final"]["relative_error"])
    _write_json(run_dir / RESULT_NAME, result)
    return result


def run_benchmark(settings: BenchSettings) -> dict:
    """Run (or resume) the benchmark; returns the summary {format, environment, settings, fp, runs}."""
    from tqdm.auto import tqdm

    from t2v.pipeline.calib_data import capture_calib_data, resolved_config
    from t2v.pipeline.config import load_inference_config
    from t2v.pipeline.sample import build_pipeline
    from t2v.pipeline.text_embeds import read_prompts

    outdir = Path(settings.outdir)
    cfg = load_inference_config(settings.config)
    cfg = cfg.replace(seed=cfg.seed if settings.seed is None else settings.seed)
    eval_file = settings.prompt_path or cfg.prompt_path
    calib_file = settings.calib_prompt_path or eval_file
    if eval_file is None:
        raise BenchmarkError(f"{settings.config} names no prompt_path: pass --prompt_path")
    evaluation, calibration = split_prompts(read_prompts(eval_file), read_prompts(calib_file),
                                            Path(calib_file).resolve() == Path(eval_file).resolve(),
                                            settings.num_prompts, settings.calib_prompts)
    names = settings.run_names()
    for name in names:  # fail on a missing config before any slow work
        quant_yaml(settings, name)
    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = build_pipeline(cfg, ckpt_path=settings.ckpt_path, device=device,
                          num_sampling_steps=settings.num_sampling_steps)
    steps = int(pipe.sampler.num_sampling_steps)
    fingerprint = _plain({"format": FORMAT, "config": resolved_config(pipe), "config_file": settings.config,
                          "ckpt_path": settings.ckpt_path, "seed": cfg.seed, "evaluation_prompts": evaluation,
                          "calibration_prompts": calibration, "x_dtype": settings.x_dtype})
    outdir.mkdir(parents=True, exist_ok=True)
    _check_run_file(outdir, fingerprint, settings.overwrite)
    done = {} if settings.overwrite else finished_runs(settings, names, steps)
    log.info("quality benchmark -> %s: FP videos in fp/, calibration data in calib_data/, each run in <run>/ "
             "(quant params, videos/, result.json); %d run(s): %s", outdir, len(names), " ".join(names))

    # 1. FP videos (reused when a previous run of the same settings saved their latents)
    started = time.time()
    loaded = None if settings.overwrite else load_videos(pipe, evaluation, outdir / "fp")
    fp_latents, fp_videos = loaded or sample_videos(pipe, evaluation, cfg.seed, outdir / "fp", settings.save_mp4)
    log.info("FP videos (%s) in %.1f s", "reused" if loaded else "sampled", time.time() - started)

    # 2. calibration data (stage 3 resumes its own shards; a complete folder is reused)
    calib_dir = outdir / "calib_data"
    if settings.overwrite or not (calib_dir / "index.json").is_file():
        capture_calib_data(pipe, [p for _, p in calibration], [i for i, _ in calibration], calib_dir, seed=cfg.seed,
                           x_dtype=settings.x_dtype, overwrite=settings.overwrite, progress=False,
                           ckpt_path=settings.ckpt_path)

    checker = load_checker()
    fp = score_run(fp_latents, fp_videos, fp_latents, fp_videos, evaluation, checker)
    fp.update(name="fp", method="fp", method_label="FP", bits=None, dtype=cfg.dtype)
    _write_json(outdir / "fp" / RESULT_NAME, fp)

    # 3. every run: calibrate, sample, score (runs finished before are read back)
    runs = []
    bar = tqdm(names, desc="methods", disable=not settings.progress)
    for name in bar:
        bar.set_postfix_str(name)
        if name in done:
            log.info("%s: done before, skipped (%s)", name, outdir / name / RESULT_NAME)
            runs.append(done[name])
            continue
        result = quantized_run(settings, pipe, name, calib_dir, evaluation, fp_latents, fp_videos, checker)
        m = result["metrics"]
        log.info("%s: PSNR %.2f dB, SSIM %.4f, temporal error %.4f, latent error %.4f", name, m["psnr"], m["ssim"],
                 m["temporal_error"], m["latent_rel_error"])
        runs.append(result)

    settings_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(settings).items()}
    settings_dict.update(num_sampling_steps=steps, sampler=cfg.scheduler.sampler, cfg_scale=cfg.scheduler.cfg_scale,
                         seed=cfg.seed, dtype=cfg.dtype, evaluation_prompts=evaluation, calibration_prompts=calibration)
    summary = {"format": FORMAT, "environment": environment(device), "settings": _plain(settings_dict),
               "fp": fp, "runs": runs}
    _write_json(outdir / "quality.json", summary)
    return summary
