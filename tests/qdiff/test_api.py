"""qdiff.api: model wrapping, state switches, timestep ranges, balancing init, save/load of quant params."""

import pytest
import torch
from torch import nn

from qdiff.adapters import ModelAdapter
from qdiff.api import (
    QuantParamsError,
    calibrate_balancing,
    fold_model,
    forward_per_step,
    init_weight_quantizers,
    load_quant_params,
    quant_layers,
    quantize_model,
    save_quant_params,
    set_quant_state,
    set_timestep,
    step_key,
    trainable_parameters,
)
from qdiff.balancing import smooth_scales
from qdiff.config import ConfigError, QuantConfig

T = 4


class ToyBlock(nn.Module):
    """A spatial linear, a 'temporal' linear on [B*S, T, C] and an MLP, plus an embedder kept in FP."""

    def __init__(self, c=48):
        super().__init__()
        self.x_embedder = nn.Linear(c, c)
        self.attn = nn.Linear(c, c)
        self.attn_temp = nn.Linear(c, c)
        self.mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))

    def forward(self, x):  # x [B, T, S, C]
        b, t, s, c = x.shape
        x = self.x_embedder(x)
        x = x + self.attn(x)
        xt = x.permute(0, 2, 1, 3).reshape(b * s, t, c)  # [B, T, S, C] -> [B*S, T, C]
        x = x + self.attn_temp(xt).reshape(b, s, t, c).permute(0, 2, 1, 3)
        return x + self.mlp(x)


ADAPTER = ModelAdapter("toy", lambda name, model: T if name == "attn_temp" else None)


def make_config(**changes):
    base = {
        "method": "qvdit",
        "weight": {"bits": 4},
        "act": {"bits": 8},
        "tqe": {"rank": 8, "rank_out": 1},
        "balance": {"method": "none"},
        "fp_layers": ["x_embedder"],
        "calib": {"timestep_ranges": 1},
    }
    base.update(changes)
    return QuantConfig.from_dict(base)


def make_model(seed=0):
    torch.manual_seed(seed)
    return ToyBlock()


def data(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T, 6, 48, generator=g)
    x[..., 3] *= 20  # an outlier channel
    return x


def test_quantize_model_swaps_by_name_and_starts_exact():
    model = make_model()
    x = data()
    ref = model(x)
    quantize_model(model, make_config(), adapter=ADAPTER)
    names = dict(quant_layers(model))
    assert set(names) == {"attn", "attn_temp", "mlp.0", "mlp.2"}
    assert type(model.x_embedder) is nn.Linear  # FP list
    assert names["attn_temp"].num_frames == T and names["attn"].num_frames is None
    assert torch.equal(model(x), ref)  # quantization starts switched off


def test_quant_state_changes_output_and_error_falls_with_bits():
    x = data()
    errors = []
    for bits in (3, 4, 8):
        model = make_model()
        ref = model(x)
        quantize_model(model, make_config(weight={"bits": bits}, act={"bits": bits}, tqe=None), adapter=ADAPTER)
        set_quant_state(model, weight=True, act=True)
        errors.append((model(x) - ref).norm() / ref.norm())
        set_quant_state(model, weight=False, act=False)
        assert torch.equal(model(x), ref)
    assert errors[0] > errors[1] > errors[2] > 0


def test_set_timestep_selects_ranges():
    model = make_model()
    quantize_model(model, make_config(calib={"timestep_ranges": 4}), adapter=ADAPTER)
    set_timestep(model, 0, 100)
    assert {l.range_index for _, l in quant_layers(model)} == {0}
    set_timestep(model, 99, 100)
    assert {l.range_index for _, l in quant_layers(model)} == {3}
    with pytest.raises(ValueError, match="step_index"):
        set_timestep(model, 100, 100)


@pytest.mark.parametrize("method,balance", [("smoothquant", "smooth"), ("quarot", "rotate"), ("viditq", "smooth_rotate")])
def test_calibrate_balancing_is_output_preserving_in_fp(method, balance):
    model = make_model()
    x = data()
    ref = model(x)
    cfg = make_config(method=method, tqe=None, balance={"method": balance, "alpha": 0.5})
    quantize_model(model, cfg, adapter=ADAPTER)
    calibrate_balancing(model, cfg, lambda: model(x))
    for _, layer in quant_layers(model):
        assert layer.smooth_scale is not None or layer._rotate
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_smoothing_reduces_activation_quant_error_on_outlier_channel():
    x = data()
    errs = {}
    for balance in ("none", "smooth"):
        model = make_model()
        ref = model(x)
        cfg = make_config(method="smoothquant" if balance == "smooth" else "ptq", tqe=None,
                          weight={"bits": 8}, act={"bits": 4}, balance={"method": balance, "alpha": 0.5})
        quantize_model(model, cfg, adapter=ADAPTER)
        calibrate_balancing(model, cfg, lambda: model(x))
        set_quant_state(model, weight=True, act=True)
        errs[balance] = ((model(x) - ref).norm() / ref.norm()).item()
    assert errs["smooth"] < errs["none"]


def test_static_activation_ranges_are_calibrated():
    model = make_model()
    x = data()
    cfg = make_config(method="ptq", tqe=None, act={"bits": 8, "mode": "static_per_tensor"})
    quantize_model(model, cfg, adapter=ADAPTER)
    calibrate_balancing(model, cfg, lambda: model(x))
    set_quant_state(model, weight=False, act=True)
    ref = make_model()(x)
    err = (model(x) - ref).norm() / ref.norm()
    assert 0 < err < 0.05


def test_trainable_parameters_groups():
    model = make_model()
    quantize_model(model, make_config(), adapter=ADAPTER)
    groups = trainable_parameters(model)
    # 4 layers x (lora_a, lora_b, lora_a_out, lora_b_out) + 1 frame scale
    assert len(groups["tqe"]) == 4 * 4 + 1
    assert len(groups["delta"]) == 4


def _quantized(cfg, seed=0):
    model = make_model(seed)
    quantize_model(model, cfg, adapter=ADAPTER)
    set_quant_state(model, weight=True, act=True)
    return model


def test_save_load_round_trip_is_exact(tmp_path):
    cfg = make_config(method="viditq", tqe={"rank": 8, "rank_out": 1}, balance={"method": "smooth_rotate", "alpha": 0.5})
    x = data()
    model = _quantized(cfg)
    calibrate_balancing(model, cfg, lambda: model(x))
    set_quant_state(model, weight=True, act=True)
    with torch.no_grad():  # pretend distillation moved the TQE terms
        for _, layer in quant_layers(model):
            layer.lora_b.normal_(0, 0.01)
            layer.lora_b_out.normal_(0, 0.01)
    init_weight_quantizers(model)
    out = model(x)
    path = save_quant_params(model, cfg, tmp_path / "q.safetensors")
    with pytest.raises(FileExistsError):
        save_quant_params(model, cfg, path)

    fresh = _quantized(cfg)
    load_quant_params(fresh, cfg, path)
    assert torch.equal(fresh(x), out)


def test_folded_model_round_trip(tmp_path):
    cfg = make_config()
    x = data()
    model = _quantized(cfg)
    out = model(x)
    fold_model(model)
    torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-5)
    path = save_quant_params(model, cfg, tmp_path / "folded.safetensors")
    fresh = _quantized(cfg)
    fold_model(fresh)
    load_quant_params(fresh, cfg, path)
    assert torch.equal(fresh(x), model(x))


def test_load_refuses_other_config_or_model(tmp_path):
    cfg = make_config()
    model = _quantized(cfg)
    init_weight_quantizers(model)
    path = save_quant_params(model, cfg, tmp_path / "q.safetensors")

    other_bits = make_config(weight={"bits": 3})
    with pytest.raises(QuantParamsError, match=r"weight\.bits: file has 4, current has 3"):
        load_quant_params(_quantized(other_bits), other_bits, path)

    class Wider(ToyBlock):
        def __init__(self):
            super().__init__(c=64)

    wide = Wider()
    quantize_model(wide, cfg, adapter=ADAPTER)
    with pytest.raises(QuantParamsError, match="in_features: file has 48, current has 64"):
        load_quant_params(wide, cfg, path)

    with pytest.raises(QuantParamsError, match="not found"):
        load_quant_params(model, cfg, tmp_path / "missing.safetensors")
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a safetensors file")
    with pytest.raises(QuantParamsError, match="not a safetensors"):
        load_quant_params(model, cfg, bogus)


# ----------------------------------------------------------------------------- per-timestep-range bits
STEPS = 4  # plan step = STEPS - 1 - sampling step


def _maps(tmp_path, weight_text, act_text=None):
    paths = {"weight_bits_file": tmp_path / "w.yaml"}
    paths["weight_bits_file"].write_text(weight_text)
    if act_text is not None:
        paths["act_bits_file"] = tmp_path / "a.yaml"
        paths["act_bits_file"].write_text(act_text)
    return {key: str(path) for key, path in paths.items()}


def _bits_config(tmp_path, weight_text=None, act_text=None, name="m"):
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    mixed = _maps(folder, weight_text, act_text) if weight_text is not None else {}
    return make_config(tqe=None, act={"bits": 6}, mixed_precision=mixed)


PER_RANGE_W = "'3-2':\n  attn: 8\n  mlp.0: fp\n'1-0': {}\n"
PER_RANGE_A = "'3-3':\n  attn_temp: 8\n'2-0': {}\n"


def test_per_step_bits_equal_uniform_models_at_their_steps(tmp_path):
    x = data()
    cfg = _bits_config(tmp_path, PER_RANGE_W, PER_RANGE_A)
    model = _quantized(cfg)
    layers = dict(quant_layers(model))
    assert layers["attn"].step_bits == ((0, 1, 4, 6), (2, 3, 8, 6))  # neighbours with equal bits merged
    assert layers["mlp.0"].step_bits == ((0, 1, 4, 6), (2, 3, None, 6))
    assert layers["attn_temp"].step_bits == ((0, 2, 4, 6), (3, 3, 4, 8))
    assert layers["mlp.2"].step_bits == () and not layers["mlp.2"].step_weight_quantizers  # same bits everywhere
    # the same steps' bits as uniform (flat) maps, or none
    uniform = {
        0: _bits_config(tmp_path, "attn: 8\nmlp.0: fp\n", "attn_temp: 8\n", "s0"),
        1: _bits_config(tmp_path, "attn: 8\nmlp.0: fp\n", name="s1"),
        2: _bits_config(tmp_path), 3: _bits_config(tmp_path),
    }
    outputs = []
    for step in range(STEPS):
        set_timestep(model, step, STEPS)
        outputs.append(model(x))
        assert torch.equal(outputs[-1], _quantized(uniform[step])(x)), step
    assert not torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[1], outputs[2])
    assert torch.equal(outputs[2], outputs[3])
    # rows of mixed steps, each run with its own step's bits
    rows = forward_per_step(model, [3, 0], STEPS, lambda index: model(x[index]))
    assert torch.equal(rows[0], outputs[3][0]) and torch.equal(rows[1], outputs[0][1])
    assert step_key(model, 2, STEPS) == step_key(model, 3, STEPS) != step_key(model, 1, STEPS)


def test_per_step_bits_refuse_other_step_counts(tmp_path):
    model = _quantized(_bits_config(tmp_path, PER_RANGE_W))
    with pytest.raises(ValueError, match=r"attn covers plan steps up to 3 \(a 4-step sampler\) but sampling runs 5"):
        set_timestep(model, 0, 5)
    with pytest.raises(ConfigError, match=r"w\.yaml: its timestep ranges hold plan steps 2\.\.3 \(2 steps\); a 4-step "
                                          r"sampler needs 0\.\.3; steps \[0, 1\] are in no range"):
        _quantized(_bits_config(tmp_path, "'3-2':\n  attn: 8\n", name="gap"))


def test_per_step_bits_save_load_round_trip(tmp_path):
    x = data()
    cfg = _bits_config(tmp_path, PER_RANGE_W, PER_RANGE_A)
    model = _quantized(cfg)
    init_weight_quantizers(model)
    attn = dict(quant_layers(model))["attn"]
    assert attn.weight_quantizer.initialized.all() and attn.step_weight_quantizers["8"].initialized.all()
    with torch.no_grad():
        attn.step_weight_quantizers["8"].delta.mul_(1.01)  # as distillation would move it
    path = save_quant_params(model, cfg, tmp_path / "q.safetensors")
    fresh = _quantized(cfg)
    load_quant_params(fresh, cfg, path)
    for step in range(STEPS):
        set_timestep(model, step, STEPS)
        set_timestep(fresh, step, STEPS)
        assert torch.equal(fresh(x), model(x))
    other = _bits_config(tmp_path, PER_RANGE_W.replace("attn: 8", "attn: 3"), PER_RANGE_A, "other")
    with pytest.raises(QuantParamsError, match=r"per-range bit map weight\.3-2\.attn: file has 8, current has 3"):
        load_quant_params(_quantized(other), other, path)


def test_balancing_statistics_and_static_ranges_per_timestep_range():
    x = data()
    cfg = make_config(method="ptq", tqe=None, act={"bits": 8, "mode": "static_per_tensor"},
                      balance={"method": "smooth", "alpha": 0.5}, calib={"timestep_ranges": 2})
    model = _quantized(cfg)

    def run_calibration():  # range 0 sees x, range 1 sees 4x
        set_timestep(model, 0, 2)
        model(x)
        set_timestep(model, 1, 2)
        model(4 * x)

    calibrate_balancing(model, cfg, run_calibration)
    attn = dict(quant_layers(model))["attn"]
    assert attn.act_absmax.shape == (2, 48) and attn.act_stats_count.tolist() == [1, 1]
    assert not torch.equal(attn.smooth_scale[0], attn.smooth_scale[1])
    for r in range(2):
        torch.testing.assert_close(attn.smooth_scale[r], smooth_scales(attn.act_absmax[r], attn.weight, 0.5), rtol=0, atol=0)
    quantizer = attn.act_quantizer
    assert quantizer.observed.tolist() == [True, True] and quantizer.x_max[1] > 1.5 * quantizer.x_max[0]  # ~2x after smoothing by sqrt(4)
    empty = _quantized(cfg)
    with pytest.raises(RuntimeError, match=r"timestep range\(s\) \[1\] of 2"):
        calibrate_balancing(empty, cfg, lambda: empty(x))  # range 0 only
