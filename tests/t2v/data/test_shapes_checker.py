"""Procedural checker: >= 98% on ground-truth videos (float, uint8, numpy, .mp4), rejects wrong captions."""
import pytest
import torch

from t2v.data import shapes
from t2v.data.checker import KEYS, check_video, parse_caption
from t2v.pipeline.video_io import read_video, save_video, to_uint8

NAMES = {"colour": list(shapes.COLOURS), "shape": list(shapes.SHAPES), "motion": list(shapes.MOTIONS)}


def accuracy(results: list[dict]) -> dict:
    return {key: sum(r[key] for r in results) / len(results) for key in KEYS}


@pytest.fixture(scope="module")
def every_caption():
    """One ground-truth video per (colour, shape, motion), backgrounds cycling: float [90, 3, 16, 32, 32], captions."""
    ids = torch.tensor([shapes.caption_index(c, s, m, (c + s + m) % 3)
                        for c in range(6) for s in range(3) for m in range(5)])
    layout = shapes.sample_layout(ids, shapes.ShapesSpec(), torch.Generator().manual_seed(0))
    return shapes.render(ids, layout, shapes.ShapesSpec()), [shapes.all_caption_list()[i] for i in ids]


def test_parse_caption_interface():
    assert parse_caption("a red circle moving left on a black background") == {
        "colour": "red", "shape": "circle", "motion": "left", "background": "black"}
    with pytest.raises(ValueError, match="purple"):
        parse_caption("a purple circle moving left on a black background")


@pytest.mark.parametrize("layout", ["float", "uint8", "numpy"])
def test_ground_truth_scores_at_least_98_percent(every_caption, layout):
    videos, captions = every_caption
    convert = {"float": lambda v: v, "uint8": to_uint8, "numpy": lambda v: to_uint8(v).numpy()}[layout]
    step = 3 if layout == "numpy" else 1  # numpy: the same path as uint8 after conversion, a subset suffices
    results = [check_video(convert(video), text) for video, text in zip(videos[::step], captions[::step])]
    assert all(set(r) == set(KEYS) and all(isinstance(v, bool) for v in r.values()) for r in results)
    scores = accuracy(results)
    assert min(scores.values()) >= 0.98, scores


def test_ground_truth_through_mp4_and_with_noise(tmp_path):
    videos, ids = shapes.sample_batch(12, torch.Generator().manual_seed(7), split="all")
    captions = [shapes.all_caption_list()[i] for i in ids]
    decoded = []
    for i, video in enumerate(videos):
        save_video(video, tmp_path / f"{i}.mp4")
        decoded.append(check_video(read_video(tmp_path / f"{i}.mp4"), captions[i]))
    noise = torch.randn(videos.shape, generator=torch.Generator().manual_seed(0))
    noisy = [check_video(video + 0.1 * n, text) for video, n, text in zip(videos, noise, captions)]
    scores = accuracy(decoded)["all"], accuracy(noisy)["all"]
    assert min(scores) >= 11 / 12, scores


@pytest.mark.parametrize("key", ["colour", "shape", "motion"])
def test_wrong_captions_are_rejected(every_caption, key):
    videos, captions = every_caption
    rejected, total = 0, 0
    for video, text in list(zip(videos, captions))[::3]:
        attrs = parse_caption(text)
        wrong = NAMES[key][(NAMES[key].index(attrs[key]) + 1) % len(NAMES[key])]
        result = check_video(video, shapes.caption(**{**attrs, key: wrong}))
        rejected += not result[key] and not result["all"]
        total += 1
    assert rejected / total >= 0.98, f"{key}: only {rejected}/{total} wrong captions rejected"


def test_blank_and_malformed_videos():
    blank = torch.full((3, 16, 32, 32), -1.0)
    assert check_video(blank, "a red circle moving left on a black background") == dict.fromkeys(KEYS, False)
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        check_video(torch.zeros(16, 32, 32, 4, dtype=torch.uint8), "a red circle moving left on a black background")
    with pytest.raises(ValueError, match=r"\[3, T, H, W\]"):
        check_video(torch.zeros(16, 32, 32, 3), "a red circle moving left on a black background")
