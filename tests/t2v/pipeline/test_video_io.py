"""Video and contact-sheet writing."""
import numpy as np
import pytest
import torch
from PIL import Image

from t2v.pipeline.video_io import read_video, save_contact_sheet, save_video, to_uint8


def _gradient_video(frames=5, height=24, width=32):
    """[3, T, H, W] in [-1, 1]: smooth gradients (codec friendly), changing over time."""
    ramp_w = torch.linspace(-1, 1, width).view(1, 1, width).expand(frames, height, width)
    ramp_h = torch.linspace(-1, 1, height).view(1, height, 1).expand(frames, height, width)
    time = torch.linspace(-0.5, 0.5, frames).view(frames, 1, 1)
    return torch.stack([ramp_w, ramp_h, (ramp_w + time).clamp(-1, 1)])


def test_to_uint8_matches_save_sample():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]).view(3, 1, 1, 2)
    out = to_uint8(x)
    assert out.shape == (1, 1, 2, 3) and out.dtype == torch.uint8
    assert out.permute(3, 0, 1, 2).flatten().tolist() == [0, 0, 128, 191, 255, 255]
    frames = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    assert to_uint8(frames) is frames


def test_save_and_read_mp4(tmp_path):
    video = _gradient_video()
    path = save_video(video, tmp_path / "out" / "v.mp4", fps=8)
    assert path.exists() and [p.name for p in path.parent.iterdir()] == ["v.mp4"]  # no temp files left
    frames = read_video(path)
    assert frames.shape == (5, 24, 32, 3) and frames.dtype == torch.uint8
    assert (frames.float() - to_uint8(video).float()).abs().mean() < 6


def test_odd_size_is_padded(tmp_path):
    frames = read_video(save_video(_gradient_video(3, 15, 21), tmp_path / "odd.mp4"))
    assert frames.shape == (3, 16, 22, 3)


def test_no_overwrite(tmp_path):
    path = save_video(_gradient_video(), tmp_path / "v.mp4")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="v.mp4"):
        save_video(_gradient_video(), path)
    assert path.read_bytes() == before
    save_video(_gradient_video(2), path, overwrite=True)
    assert read_video(path).shape[0] == 2


def test_contact_sheet(tmp_path):
    video = _gradient_video(frames=5, height=24, width=32)
    path = save_contact_sheet(video, tmp_path / "sheet.png", ncols=2)
    with Image.open(path) as image:
        assert image.size == (2 * 32, 3 * 24)
        pixels = torch.from_numpy(np.array(image))
    expected = to_uint8(video)
    assert torch.equal(pixels[24:48, 32:64], expected[3])
    assert torch.count_nonzero(pixels[48:, 32:]) == 0  # empty sixth cell
    with pytest.raises(FileExistsError):
        save_contact_sheet(video, path)


def test_missing_mp4_writer_fails_before_sampling(monkeypatch, tmp_path):
    """Without imageio-ffmpeg, stage 2/5 stop with an install hint before sampling anything."""
    import sys

    from t2v.pipeline import sample
    from t2v.pipeline.video_io import require_video_writer

    require_video_writer()  # present in CI: no error
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # makes `import imageio_ffmpeg` raise ImportError
    with pytest.raises(RuntimeError, match="pip install imageio-ffmpeg"):
        require_video_writer()

    def must_not_sample(*args, **kwargs):
        raise AssertionError("sampled although the video writer is missing")

    monkeypatch.setattr(sample, "sample_latents", must_not_sample)
    with pytest.raises(RuntimeError, match="imageio-ffmpeg"):
        sample.generate_videos(pipe=None, prompts=["a red circle"], outdir=tmp_path / "videos")
    assert not (tmp_path / "videos").exists()
