"""qdiff/adapters/stdit.py: the STDiT facts qdiff needs."""
from qdiff.adapters import stdit


def test_temporal_pattern():
    assert stdit.is_temporal("blocks.3.attn_temp.q")
    assert not stdit.is_temporal("blocks.3.attn.q")
    assert not stdit.is_temporal("blocks.3.cross_attn.q_linear")


def test_num_frames_for():
    config = {"input_size": (16, 64, 64), "patch_size": (1, 2, 2)}
    assert stdit.num_frames_for("blocks.0.attn_temp.proj", config) == 16
    assert stdit.num_frames_for("blocks.0.attn.proj", config) is None
    assert stdit.num_frames_for("blocks.0.attn_temp.q", {"input_size": [5, 8, 8], "patch_size": [2, 2, 2]}) == 3


def test_default_fp_layers_and_block_linears():
    assert stdit.DEFAULT_FP_LAYERS == ("x_embedder", "t_embedder", "t_block", "y_embedder", "final_layer")
    assert len(stdit.BLOCK_LINEARS) == 13 and len(set(stdit.BLOCK_LINEARS)) == 13


def test_shipped_fp_list_matches_adapter():
    from pathlib import Path

    from qdiff.mixed_precision import load_fp_layers

    remain_fp = Path(__file__).resolve().parents[3] / "configs" / "quant" / "remain_fp.txt"
    assert set(load_fp_layers(remain_fp)) == set(stdit.DEFAULT_FP_LAYERS)
