"""Procedural shape videos: grammar round trip, held-out split, determinism, value range, layout limits."""
import itertools
from pathlib import Path

import pytest
import torch

from t2v.data import shapes

REPO = Path(__file__).resolve().parents[3]


def test_grammar_round_trip_over_all_captions():
    captions = shapes.all_caption_list()
    assert len(captions) == 6 * 3 * 5 * 3 == len(set(captions))
    names = (list(shapes.COLOURS), shapes.SHAPES, shapes.MOTIONS, list(shapes.BACKGROUNDS))
    for combo in itertools.product(*(range(len(n)) for n in names)):
        text = captions[shapes.caption_index(*combo)]
        assert shapes.parse(text) == {key: n[i] for key, n, i in zip(shapes.ATTRIBUTES, names, combo)}
        back = shapes.attributes_of_index(torch.tensor([shapes.caption_index(*combo)]))
        assert tuple(int(back[key]) for key in shapes.ATTRIBUTES) == combo
    assert shapes.parse("A  Red circle standing still on a GRAY background")["motion"] == "static"
    vocabulary = set(shapes.vocabulary())
    assert all(set(text.split()) <= vocabulary for text in captions)
    assert len(vocabulary) == len(shapes.vocabulary()) == 22


@pytest.mark.parametrize("bad", ["a purple circle moving left on a black background",
                                 "a red hexagon moving left on a black background",
                                 "a red circle moving sideways on a black background", "a red circle"])
def test_parse_rejects_captions_outside_the_grammar(bad):
    with pytest.raises(ValueError, match="caption"):
        shapes.parse(bad)


def test_heldout_split_is_disjoint_and_every_pair_is_still_seen():
    train, heldout = set(shapes.all_captions("train")), set(shapes.all_captions("heldout"))
    assert len(train) == 216 and len(heldout) == 54 and not train & heldout
    assert train | heldout == set(shapes.all_caption_list())
    seen = [shapes.parse(t) for t in train]
    for a, b in itertools.combinations(("colour", "shape", "motion"), 2):
        all_pairs = {(x[a], x[b]) for x in map(shapes.parse, shapes.all_caption_list())}
        assert {(x[a], x[b]) for x in seen} == all_pairs, f"some ({a}, {b}) pair is never trained on"
    combos = {tuple(shapes.parse(t)[k] for k in ("colour", "shape", "motion")) for t in heldout}
    assert len(combos) == 18
    assert set(shapes.heldout_prompts()) <= heldout and len(set(shapes.heldout_prompts())) == 18
    assert set(shapes.train_prompts()) <= train and len(set(shapes.train_prompts())) == 18


def test_prompt_files_match_the_generator():
    for name, prompts in (("heldout", shapes.heldout_prompts()), ("train", shapes.train_prompts())):
        lines = (REPO / f"configs/prompts/tiny_shapes_{name}.txt").read_text().split("\n")
        assert [line for line in lines if line] == prompts


def test_training_batches_never_show_heldout_captions():
    ids = shapes.sample_caption_ids(4000, "train", torch.Generator().manual_seed(0))
    assert not set(ids.tolist()) & set(shapes.split_caption_indices("heldout").tolist())
    assert len(set(ids.tolist())) == 216  # and every training caption turns up


def test_batches_are_deterministic_by_seed_with_the_right_shape_and_range():
    a, ids_a = shapes.sample_batch(8, torch.Generator().manual_seed(5))
    b, ids_b = shapes.sample_batch(8, torch.Generator().manual_seed(5))
    c, _ = shapes.sample_batch(8, torch.Generator().manual_seed(6))
    assert a.shape == (8, 3, 16, 32, 32) and a.dtype == torch.float32 and ids_a.shape == (8,)
    assert torch.equal(a, b) and torch.equal(ids_a, ids_b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1


def test_shape_stays_inside_the_frame_and_colours_are_exact():
    videos, ids = shapes.sample_batch(64, torch.Generator().manual_seed(1), split="all")
    attrs = shapes.attributes_of_index(ids)
    backgrounds = torch.tensor(list(shapes.BACKGROUNDS.values())) * 2 - 1
    palette = torch.tensor(list(shapes.COLOURS.values())) * 2 - 1
    for video, colour, background in zip(videos, attrs["colour"], attrs["background"]):
        bg = backgrounds[background][:, None, None, None]
        border = torch.cat([video[..., 0, :], video[..., -1, :], video[..., :, 0], video[..., :, -1]], dim=-1)
        assert torch.equal(border, bg[..., 0].expand_as(border)), "the shape touched the frame border"
        is_object = (video - palette[colour][:, None, None, None]).abs().amax(0) < 1e-6  # [T, H, W]
        assert is_object.flatten(1).sum(1).min() >= 16  # every frame shows the full-colour shape (smallest: ~24 px)


def test_render_caption_moves_the_way_the_caption_says():
    for motion, (dx, dy) in shapes.MOTION_DIRECTIONS.items():
        video = shapes.render_caption(shapes.caption("red", "square", motion, "black"), seed=3)
        red = (video[0] > 0) & (video[1] < 0)  # [T, H, W]
        ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        cx = [(xs[m]).mean() for m in red]
        cy = [(ys[m]).mean() for m in red]
        move = (float(cx[-1] - cx[0]), float(cy[-1] - cy[0]))
        expected = (dx * 10, dy * 10)
        assert all(abs(m) >= abs(e) - 1e-3 and m * e >= 0 for m, e in zip(move, expected)), (motion, move)
        if motion == "static":
            assert move == (0.0, 0.0)


def test_spec_rejects_a_frame_too_small_for_the_travel():
    with pytest.raises(ValueError, match="travel"):
        shapes.ShapesSpec(height=16, width=16)


@pytest.mark.gpu
def test_generation_on_gpu_matches_shapes_and_is_deterministic():
    a, _ = shapes.sample_batch(64, torch.Generator("cuda").manual_seed(0), device="cuda")
    b, _ = shapes.sample_batch(64, torch.Generator("cuda").manual_seed(0), device="cuda")
    assert a.is_cuda and a.shape == (64, 3, 16, 32, 32) and torch.equal(a, b)
