"""Run comparison: PSNR / relative-error math, folder matching, the markdown table."""
import math
import shutil

import pytest
import torch

from qdiff.io import save_safetensors_atomic
from t2v.pipeline.compare import (
    RunComparison,
    compare_run,
    compare_runs,
    format_table,
    psnr,
    psnr_from_mse,
    relative_error,
    write_table,
)
from t2v.pipeline.video_io import save_video


def test_psnr_math():
    ref = torch.full((2, 4, 4, 3), 100, dtype=torch.uint8)
    assert psnr(ref, ref.clone()) == math.inf
    off_by_one = ref + 1  # MSE 1 -> 20·log10(255)
    assert psnr(off_by_one, ref) == pytest.approx(20 * math.log10(255))
    half = ref.clone()
    half[0] += 10  # half the pixels off by 10: MSE 50
    assert psnr(half, ref) == pytest.approx(10 * math.log10(255 ** 2 / 50))
    assert psnr_from_mse(0.0) == math.inf
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(ref[:1], ref)


def test_relative_error():
    z = torch.tensor([3.0, 4.0])
    assert relative_error(z, z) == 0
    assert relative_error(z + torch.tensor([0.3, 0.4]), z) == pytest.approx(0.1)


def _video(seed, frames=3, size=16):
    gen = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-0.8, 0.8, size)
    base = torch.stack([ramp.view(1, 1, size).expand(frames, size, size)] * 3)  # [3, T, H, W] smooth
    return (base + 0.05 * torch.randn(base.shape, generator=gen)).clamp(-1, 1)


def _write_run(folder, videos, latents):
    for name, video in videos.items():
        save_video(video, folder / f"{name}.mp4")
        save_safetensors_atomic({"latent": latents[name]}, folder / f"{name}.latent.safetensors")


def test_compare_folders(tmp_path):
    names = ["sample_0000_a", "sample_0001_b"]
    latents = {n: torch.randn(4, 3, 8, 8) for n in names}
    fp = tmp_path / "fp"
    _write_run(fp, {n: _video(i) for i, n in enumerate(names)}, latents)
    same = tmp_path / "same"
    shutil.copytree(fp, same)
    noisy = tmp_path / "noisy"
    _write_run(noisy, {n: _video(i + 10) for i, n in enumerate(names)}, {n: 1.1 * latents[n] for n in names})

    identical, different = compare_runs(fp, [same, noisy], names=["same", "noisy"])
    assert identical.psnr == math.inf and identical.latent_rel_error == 0 and identical.num_videos == 2
    assert 10 < different.psnr < 60 and different.latent_rel_error == pytest.approx(0.1, rel=1e-5)
    assert set(different.per_video) == set(names)

    (noisy / f"{names[1]}.latent.safetensors").unlink()  # latents are optional: the column says n/a
    assert compare_run(fp, noisy).latent_rel_error is None
    (noisy / f"{names[1]}.mp4").unlink()
    with pytest.raises(FileNotFoundError, match=names[1]):
        compare_run(fp, noisy)
    with pytest.raises(FileNotFoundError, match="not found"):
        compare_run(fp, tmp_path / "nowhere")


def test_table_format_and_write(tmp_path):
    rows = [RunComparison("w8a8", 10, 0.012345, 35.678), RunComparison("fp copy", 10, 0.0, math.inf),
            RunComparison("no latents", 3, None, 20.0)]
    table = format_table(rows)
    assert table.splitlines() == [
        "| run | videos | rel. latent error vs FP | PSNR vs FP (dB) |",
        "|---|---:|---:|---:|",
        "| w8a8 | 10 | 0.0123 | 35.68 |",
        "| fp copy | 10 | 0.0000 | inf |",
        "| no latents | 3 | n/a | 20.00 |",
    ]
    path = write_table(table, tmp_path / "t.md")
    assert path.read_text() == table
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_table(table, path)
    write_table("x\n", path, overwrite=True)
    assert path.read_text() == "x\n" and sorted(p.name for p in tmp_path.iterdir()) == ["t.md"]
