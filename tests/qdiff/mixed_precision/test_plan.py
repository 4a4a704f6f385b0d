"""qdiff/mixed_precision/plan.py: the reference YAML shapes, remain_fp lists, errors."""
from pathlib import Path

import pytest

from qdiff.mixed_precision import FP_BITS, BitPlan, is_fp, load_bit_plan, load_fp_layers

REPO = Path(__file__).resolve().parents[3]
SHIPPED = REPO / "configs" / "quant"


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_flat_reference_shape_strips_model_prefix(tmp_path):
    path = _write(tmp_path, "w.yaml", "model.blocks.0.attn.q: 3\nmodel.blocks.0.mlp.fc1: 8\nblocks.1.mlp.fc2: fp\n")
    plan = load_bit_plan(path, default_bits=4)
    assert plan.bits_for("blocks.0.attn.q") == 3
    assert plan.bits_for("model.blocks.0.mlp.fc1") == 8
    assert plan.bits_for("blocks.1.mlp.fc2") == FP_BITS
    assert plan.bits_for("blocks.5.attn.k") == 4  # not listed: the default


def test_per_range_shape(tmp_path):
    text = "'19-15':\n  model.blocks.0.attn.q: 8\n14-10:\n  model.blocks.0.attn.q: 4\n"
    plan = load_bit_plan(_write(tmp_path, "t20.yaml", text), default_bits=6)
    assert plan.bits_for("blocks.0.attn.q", "19-15") == 8
    assert plan.bits_for("blocks.0.attn.q", "14-10") == 4
    assert plan.bits_for("blocks.0.attn.q", 12) == 4  # a step index is looked up in the ranges
    assert plan.bits_for("blocks.0.attn.k", "14-10") == 6
    with pytest.raises(ValueError, match="range_key"):
        plan.bits_for("blocks.0.attn.q")
    with pytest.raises(ValueError, match="'9-0'"):
        plan.bits_for("blocks.0.attn.q", "9-0")
    with pytest.raises(ValueError, match="step 3"):
        plan.bits_for("blocks.0.attn.q", 3)


def test_shipped_maps_cover_all_mlps():
    for name in ("weight_8_mlp.yaml", "act_8_mlp.yaml"):
        plan = load_bit_plan(SHIPPED / "mixed_precision" / name, default_bits=3)
        assert len(plan.overrides) == 56  # 28 blocks x (fc1, fc2)
        assert all(plan.bits_for(f"blocks.{b}.mlp.fc{i}") == 8 for b in range(28) for i in (1, 2))
        assert plan.bits_for("blocks.27.attn_temp.v") == 3


@pytest.mark.parametrize("bits", [1, 9, 12, "8", True, 3.5])
def test_bad_bits_name_the_key(tmp_path, bits):
    path = _write(tmp_path, "bad.yaml", f"blocks.0.mlp.fc1: {bits!r}\n" if isinstance(bits, str) else f"blocks.0.mlp.fc1: {str(bits).lower()}\n")
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1.*allowed 2\.\.8, or 16/'fp'"):
        load_bit_plan(path, 4)


def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_bit_plan(tmp_path / "nope.yaml", 4)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_fp_layers(tmp_path / "nope.txt")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", ""])
def test_non_mapping_yaml(tmp_path, text):
    with pytest.raises(ValueError, match="expected a mapping"):
        load_bit_plan(_write(tmp_path, "list.yaml", text), 4)


def test_mixed_shapes_and_bad_range_key(tmp_path):
    with pytest.raises(ValueError, match="mixes"):
        load_bit_plan(_write(tmp_path, "m.yaml", "99-75:\n  blocks.0.mlp.fc1: 8\nblocks.0.mlp.fc2: 8\n"), 4)
    with pytest.raises(ValueError, match="'early'"):
        load_bit_plan(_write(tmp_path, "r.yaml", "early:\n  blocks.0.mlp.fc1: 8\n"), 4)


def test_bitplan_in_memory_validates():
    with pytest.raises(ValueError, match="default_bits"):
        BitPlan(default_bits=1)
    plan = BitPlan(default_bits=4, overrides={"model.blocks.0.mlp.fc1": 8})
    assert plan.bits_for("blocks.0.mlp.fc1") == 8
    with pytest.raises(TypeError):
        plan.overrides["x"] = 3  # read-only


def test_fp_list_and_prefix_matching(tmp_path):
    path = _write(tmp_path, "fp.txt", "# comment\nx_embedder\n\nblocks.6.mlp   # trailing comment\nmodel.final_layer\nblocks.1\n")
    prefixes = load_fp_layers(path)
    assert prefixes == ("x_embedder", "blocks.6.mlp", "final_layer", "blocks.1")
    assert is_fp("blocks.6.mlp.fc1", prefixes)
    assert is_fp("model.x_embedder.proj", prefixes)
    assert is_fp("blocks.1.attn.q", prefixes)
    assert not is_fp("blocks.10.attn.q", prefixes)  # `blocks.1` is not a prefix of `blocks.10`
    assert not is_fp("blocks.6.mlp_extra", prefixes)
    assert not is_fp("blocks.16.mlp.fc1", prefixes)


def test_shipped_fp_lists():
    assert load_fp_layers(SHIPPED / "remain_fp.txt") == ("x_embedder", "t_embedder", "t_block", "y_embedder", "final_layer")
    w6 = load_fp_layers(SHIPPED / "remain_fp_w6.txt")
    assert w6[-2:] == ("blocks.6.mlp", "blocks.26.mlp") and len(w6) == 7


def test_base_bits_steps_and_overlapping_ranges(tmp_path):
    plan = load_bit_plan(_write(tmp_path, "t.yaml", "'19-15':\n  blocks.0.attn.q: 8\n14-10:\n  blocks.0.attn.q: fp\n"), 4)
    assert plan.base_bits("model.blocks.0.attn.q") == 4  # outside the ranges: the default
    assert plan.range_steps() == set(range(10, 20))
    assert BitPlan(4, {"blocks.0.attn.q": 3}).base_bits("blocks.0.attn.q") == 3
    assert BitPlan(4).range_steps() == set()
    with pytest.raises(ValueError, match=r"o\.yaml: timestep ranges '6-0' and '9-5' overlap"):
        load_bit_plan(_write(tmp_path, "o.yaml", "9-5:\n  blocks.0.attn.q: 8\n6-0:\n  blocks.0.attn.q: 4\n"), 4)
