"""qdiff/config.py: the shipped configs, resolve_bits, errors naming keys, CLI overrides."""
import json
from pathlib import Path

import pytest

from qdiff.config import (
    ConfigError,
    ConfigFileNotFoundError,
    DistillConfig,
    QuantConfig,
    apply_overrides,
)
from qdiff.quantizers.config import BalanceConfig

REPO = Path(__file__).resolve().parents[2]
QUANT_CONFIGS = REPO / "configs" / "quant"
SHIPPED = sorted(QUANT_CONFIGS.glob("*.yaml"))
PRECISIONS = ("w8a8", "w4a8", "w4a6", "w3a8", "w3a6")
METHOD_FILES = ("qvdit", "ptq", "smoothquant", "quarot", "viditq")


def test_every_expected_config_ships():
    names = {path.stem for path in SHIPPED}
    expected = {f"{p}_{m}" for p in PRECISIONS for m in METHOD_FILES} | {"w4a6_qvdit_uniform", "w3a6_qvdit_uniform"}
    assert expected <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_config_loads_and_round_trips(path):
    cfg = QuantConfig.from_yaml(path)
    bits = path.stem[:4]
    assert cfg.weight.bits == int(bits[1]) and cfg.act.bits == int(bits[3])
    data = cfg.to_dict()
    json.dumps(data)  # JSON-able for quant-param headers
    again = QuantConfig.from_dict(data)
    assert again.to_dict() == data and again == cfg.replace(fp_layers=tuple(data["fp_layers"]))
    # mixed precision exactly where the reference applies it, except the uniform variants
    uniform = path.stem.endswith("_uniform")
    assert (cfg.mixed_precision.weight_bits_file is not None) == (cfg.weight.bits <= 4 and not uniform)
    assert (cfg.mixed_precision.act_bits_file is not None) == (cfg.act.bits <= 6 and not uniform)
    assert cfg.is_fp("x_embedder.proj") and cfg.is_fp("final_layer.linear")
    assert cfg.distill.enabled == (cfg.method == "qvdit")


def test_qvdit_per_config_settings():
    # METHOD.md §5: iterations, smoothing, steps, TMD
    expected = {
        "w8a8": (5000, "none", 100, True),
        "w4a8": (10000, "smooth", 100, True),
        "w4a6": (10000, "none", 20, False),
        "w3a8": (15000, "smooth", 100, True),
    }
    for precision, (iterations, balance, n_steps, tmd) in expected.items():
        cfg = QuantConfig.from_yaml(QUANT_CONFIGS / f"{precision}_qvdit.yaml")
        assert (cfg.distill.iterations, cfg.balance.method, cfg.calib.n_steps, cfg.distill.tmd) == (
            iterations, balance, n_steps, tmd
        ), precision
        assert cfg.tqe is not None and cfg.tqe.rank == 32 and cfg.tqe.rank_out == 1
        if balance == "smooth":
            assert cfg.balance.alpha == 0.11
    assert QuantConfig.from_yaml(QUANT_CONFIGS / "w4a8_ptq.yaml").act.mode == "static_per_tensor"
    assert QuantConfig.from_yaml(QUANT_CONFIGS / "w4a8_viditq.yaml").balance.method == "smooth_rotate"


def test_resolve_bits_w3a6():
    cfg = QuantConfig.from_yaml(QUANT_CONFIGS / "w3a6_qvdit.yaml")
    assert cfg.resolve_bits("blocks.0.mlp.fc1") == (8, 8)
    assert cfg.resolve_bits("blocks.27.mlp.fc2") == (8, 8)
    assert cfg.resolve_bits("blocks.0.attn.q") == (3, 6)
    assert cfg.resolve_bits("model.blocks.5.attn_temp.proj") == (3, 6)
    assert cfg.resolve_bits("x_embedder") == (None, None)
    assert cfg.resolve_bits("x_embedder.proj") == (None, None)
    uniform = QuantConfig.from_yaml(QUANT_CONFIGS / "w3a6_qvdit_uniform.yaml")
    assert uniform.resolve_bits("blocks.0.mlp.fc1") == (3, 6)


def test_apply_below_rules():
    cfg = QuantConfig.from_yaml(QUANT_CONFIGS / "w3a6_qvdit.yaml")
    # W6A8: neither map applies (W > 4, A > 6) although both files are set
    assert apply_overrides(cfg, ["weight.bits=6", "act.bits=8"]).resolve_bits("blocks.0.mlp.fc1") == (6, 8)
    # raising the thresholds makes them apply
    raised = apply_overrides(cfg, ["weight.bits=6", "mixed_precision.weight_bits_apply_below=6"])
    assert raised.resolve_bits("blocks.0.mlp.fc1") == (8, 8)
    assert raised.resolve_bits("blocks.0.attn.q") == (6, 6)


def test_fp_layers_list_and_w6_file(tmp_path):
    cfg = QuantConfig.from_dict({"fp_layers_file": str(QUANT_CONFIGS / "remain_fp_w6.txt"), "fp_layers": ["blocks.1"]})
    assert cfg.resolve_bits("blocks.26.mlp.fc2") == (None, None)
    assert cfg.resolve_bits("blocks.1.attn.q") == (None, None)
    assert cfg.resolve_bits("blocks.10.attn.q") == (8, 8)


def _yaml(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_relative_paths_resolve_from_yaml_dir(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "fp.txt").write_text("x_embedder\n")
    cfg = QuantConfig.from_yaml(_yaml(tmp_path / "sub", "fp_layers_file: fp.txt\n"))
    assert cfg.fp_layers_file == str((tmp_path / "sub" / "fp.txt").resolve())


def test_unknown_top_level_key_lists_allowed(tmp_path):
    path = _yaml(tmp_path, "method: qvdit\nmethdo: ptq\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml: methdo: unknown key; allowed keys are \['method', 'weight'"):
        QuantConfig.from_yaml(path)


def test_unknown_nested_key(tmp_path):
    with pytest.raises(ConfigError, match=r"distill\.iters: unknown key; allowed keys are \['enabled', 'iterations'"):
        QuantConfig.from_yaml(_yaml(tmp_path, "distill: {iters: 10}\n"))
    with pytest.raises(ConfigError, match=r"weight\.n_bits: unknown key"):
        QuantConfig.from_yaml(_yaml(tmp_path, "weight: {n_bits: 4}\n"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("distill: {lr: abc}\n", r"distill\.lr: expected a positive float, got 'abc'"),
        ("distill: {iterations: -5}\n", r"distill\.iterations: expected a positive int, got -5"),
        ("distill: {tmd: maybe}\n", r"distill\.tmd: expected a bool"),
        ("calib: {n_steps: 0}\n", r"calib\.n_steps: expected a positive int"),
        ("act: {bits: 9}\n", r"act\.bits: .*2\.\.8, got 9"),
        ("act: {mode: per_tensor}\n", r"act\.mode: .*dynamic_per_token"),
        ("balance: {method: smooth, alpha: 2.0}\n", r"balance\.alpha"),
        ("method: gptq\n", r"method: expected one of \['ptq', 'smoothquant', 'quarot', 'viditq', 'qvdit'\]"),
        ("method: quarot\n", r"balance\.method: method 'quarot' needs 'rotate'"),
        ("weight: 4\n", r"weight: expected a mapping"),
        ("fp_layers: x_embedder\n", r"fp_layers: expected a list"),
        ("- 1\n- 2\n", r"expected a mapping at the top level"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        QuantConfig.from_yaml(_yaml(tmp_path, text))


def test_missing_referenced_file_names_yaml_and_file(tmp_path):
    path = _yaml(tmp_path, "mixed_precision: {weight_bits_file: missing_map.yaml}\n")
    with pytest.raises(ConfigFileNotFoundError, match=r"cfg\.yaml: mixed_precision\.weight_bits_file: file not found: 'missing_map\.yaml'"):
        QuantConfig.from_yaml(path)
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        QuantConfig.from_yaml(_yaml(tmp_path, "fp_layers_file: nowhere.txt\n"))
    with pytest.raises(FileNotFoundError, match="no_such_config.yaml"):
        QuantConfig.from_yaml(tmp_path / "no_such_config.yaml")


def test_bad_bits_inside_referenced_map(tmp_path):
    _yaml(tmp_path, "blocks.0.mlp.fc1: 12\n", name="map.yaml")
    with pytest.raises(ConfigError, match=r"blocks\.0\.mlp\.fc1: bad bit width 12"):
        QuantConfig.from_yaml(_yaml(tmp_path, "mixed_precision: {weight_bits_file: map.yaml}\n"))


def test_string_numbers_from_yaml_are_coerced(tmp_path):
    cfg = QuantConfig.from_yaml(_yaml(tmp_path, "distill: {lr: 1e-5, lr_delta: 1e-6, iterations: 1.5e4}\n"))
    assert cfg.distill.lr == 1e-5 and cfg.distill.lr_delta == 1e-6 and cfg.distill.iterations == 15000


def test_overrides():
    cfg = QuantConfig.from_yaml(QUANT_CONFIGS / "w4a8_qvdit.yaml")
    new = apply_overrides(cfg, ["distill.iterations=10", "act.bits=6", "--quant.balance.alpha=0.2", "distill.lr=2e-5"])
    assert new.distill.iterations == 10 and new.act.bits == 6 and new.balance.alpha == 0.2 and new.distill.lr == 2e-5
    assert cfg.distill.iterations == 10000  # the original is untouched
    assert apply_overrides(cfg, ["tqe=null"]).tqe is None
    assert apply_overrides(apply_overrides(cfg, ["tqe=null"]), ["tqe.rank=16"]).tqe.rank == 16
    assert apply_overrides(cfg, ["distill.tmd=false"]).distill.tmd is False
    assert apply_overrides(cfg, ["method=viditq", "distill.enabled=false"]).method == "viditq"


@pytest.mark.parametrize(
    "override, message",
    [
        ("distill.lr=abc", r"distill\.lr: expected a positive float, got 'abc'"),
        ("distill.iters=10", r"distill\.iters: unknown key; allowed keys are \['enabled'"),
        ("distil.iterations=10", r"distil: unknown key; allowed keys are \['method'"),
        ("act.bits=10", r"act\.bits"),
        ("distill.iterations", r"expected KEY\.PATH=VALUE"),
        ("method.x=1", r"method\.x: no such key"),
        ("mixed_precision.act_bits_file=missing.yaml", r"mixed_precision\.act_bits_file: file not found"),
    ],
)
def test_override_errors(override, message):
    cfg = QuantConfig.from_yaml(QUANT_CONFIGS / "w4a8_qvdit.yaml")
    with pytest.raises(ConfigError, match=message):
        apply_overrides(cfg, [override])


def test_replace_and_direct_construction():
    cfg = QuantConfig(method="smoothquant", balance=BalanceConfig(method="smooth", alpha=0.3))
    assert cfg.resolve_bits("anything") == (8, 8)
    assert cfg.replace(distill=DistillConfig(enabled=True)).distill.enabled
    assert cfg.replace(distill={"enabled": True, "iterations": 7}).distill.iterations == 7
    with pytest.raises(ConfigError, match="distill.iterations"):
        cfg.replace(distill={"iterations": 0})
    with pytest.raises(ConfigError, match="iterations"):
        DistillConfig(iterations=0)


def test_per_range_maps_resolve_per_plan_step(tmp_path):
    weight_map = tmp_path / "w.yaml"
    weight_map.write_text("'4-3':\n  blocks.0.attn.q: 8\n'2-0': {}\n")
    act_map = tmp_path / "a.yaml"
    act_map.write_text("'4-4':\n  blocks.0.attn.q: fp\n'3-0':\n  blocks.0.attn.k: 8\n")
    cfg = QuantConfig.from_dict({"weight": {"bits": 4}, "act": {"bits": 6},
                                 "mixed_precision": {"weight_bits_file": str(weight_map), "act_bits_file": str(act_map)}})
    assert cfg.resolve_bits("blocks.0.attn.q") == (4, 6)  # no range: the base bits
    assert [cfg.resolve_bits("blocks.0.attn.q", step) for step in (4, 3, 0)] == [(8, None), (8, 6), (4, 6)]
    assert cfg.resolve_bits("blocks.0.attn.k", 0) == (4, 8)
    assert cfg.step_segments() == ((0, 2), (3, 3), (4, 4))  # where both maps are constant
    assert cfg.range_maps() == {"weight": {"4-3": {"blocks.0.attn.q": 8}, "2-0": {}},
                                "act": {"4-4": {"blocks.0.attn.q": 16}, "3-0": {"blocks.0.attn.k": 8}}}
    cfg.check_step_segments(5)
    with pytest.raises(ConfigError, match=r"w\.yaml: its timestep ranges hold plan steps 0\.\.4 \(5 steps\); a 20-step "
                                          r"sampler needs 0\.\.19; steps \[5, 6"):
        cfg.check_step_segments(20)
    with pytest.raises(ConfigError, match=r"w\.yaml.*a 3-step sampler needs 0\.\.2$"):
        cfg.check_step_segments(3)
    short = tmp_path / "short.yaml"
    short.write_text("'3-0': {}\n")
    with pytest.raises(ConfigError, match=r"short\.yaml: .* 0\.\.3 \(4 steps\); a 5-step sampler needs 0\.\.4; steps \[4\]"):
        apply_overrides(cfg, [f"mixed_precision.weight_bits_file={short}"]).check_step_segments()
    # maps that do not apply (base bits above the threshold) add no segments
    above = apply_overrides(cfg, ["weight.bits=8", "act.bits=8"])
    assert above.step_segments() == () and above.range_maps() == {} and above.resolve_bits("blocks.0.attn.q", 4) == (8, 8)


def test_shipped_timestep_wise_example():
    cfg = QuantConfig.from_yaml(QUANT_CONFIGS / "w4a8_viditq_timestep_mp.yaml")
    assert cfg.step_segments() == ((0, 74), (75, 99))
    assert [cfg.resolve_bits("blocks.27.attn_temp.v", step) for step in (99, 75, 74, 0)] == [(8, 8)] * 2 + [(4, 8)] * 2
    assert {cfg.resolve_bits("blocks.3.mlp.fc2", step) for step in range(100)} == {(8, 8)}
    cfg.check_step_segments(100)
    with pytest.raises(ConfigError, match="a 20-step sampler"):
        cfg.check_step_segments(20)
