"""Integer-weights files: export -> load round trip is exact; files for another model/config are refused."""
import copy

import pytest
import torch
from safetensors import safe_open
from torch import nn

from qdiff.adapters import ModelAdapter
from qdiff.api import QuantParamsError, calibrate_balancing, init_weight_quantizers, quantize_model, set_quant_state
from qdiff.balancing import random_hadamard
from qdiff.config import QuantConfig
from qdiff.lowbit import (
    IntExportError,
    IntLinear,
    IntWeightsError,
    architecture_fingerprint,
    convert_to_int,
    export_int_model,
    int_layers,
    load_int_model,
    read_int_header,
)

T = 4
INFO = {"hidden_size": 48, "depth": 1}


class Toy(nn.Module):
    """An embedder kept in FP, a spatial linear, a temporal linear on [B*S, T, C] and an MLP."""

    def __init__(self, c=48):
        super().__init__()
        self.embed = nn.Linear(c, c)
        self.attn = nn.Linear(c, c)
        self.attn_temp = nn.Linear(c, c)
        self.mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))
        self.norm = nn.LayerNorm(c)

    def forward(self, x):  # x [B, T, S, C]
        b, t, s, c = x.shape
        x = self.embed(x)
        x = x + self.attn(self.norm(x))
        xt = x.permute(0, 2, 1, 3).reshape(b * s, t, c)  # [B, T, S, C] -> [B*S, T, C]
        x = x + self.attn_temp(xt).reshape(b, s, t, c).permute(0, 2, 1, 3)
        return x + self.mlp(x)


ADAPTER = ModelAdapter("toy", lambda name, model: T if name == "attn_temp" else None)


def config(**changes):
    base = {"method": "qvdit", "weight": {"bits": 4}, "act": {"bits": 8}, "tqe": {"rank": 4, "rank_out": 1},
            "balance": {"method": "smooth_rotate", "alpha": 0.5}, "fp_layers": ["embed"]}
    base.update(changes)
    return QuantConfig.from_dict(base)


def calibrated(qconfig, c=48):
    torch.manual_seed(0)
    model = Toy(c)
    quantize_model(model, qconfig, adapter=ADAPTER)
    calibrate_balancing(model, qconfig, lambda: model(torch.randn(2, T, 6, c)))
    init_weight_quantizers(model)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "lora_b", None) is not None:
                module.lora_b.normal_(0, 0.01)
                module.lora_b_out.normal_(0, 0.01)
            if getattr(module, "frame_scale", None) is not None:
                module.frame_scale.normal_(0, 0.5)
    set_quant_state(model, weight=True, act=True)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    qconfig = config()
    model = calibrated(qconfig)
    path = export_int_model(model, tmp_path_factory.mktemp("int") / "int_weights.safetensors", qconfig, INFO)
    return qconfig, model, path


def test_round_trip_is_exact(exported):
    qconfig, model, path = exported
    x = torch.randn(2, T, 6, 48)
    with torch.no_grad():
        fake = model(x)
        converted = convert_to_int(copy.deepcopy(model))
        loaded = load_int_model(Toy(), path, qconfig, INFO)  # a fresh FP model: embed keeps its own weights
        loaded.embed.load_state_dict(model.embed.state_dict())
        loaded.norm.load_state_dict(model.norm.state_dict())
        out_converted, out_loaded = converted(x), loaded(x)
    assert sorted(n for n, _ in int_layers(loaded)) == ["attn", "attn_temp", "mlp.0", "mlp.2"]
    assert isinstance(loaded.embed, nn.Linear) and not isinstance(loaded.embed, IntLinear)
    for (name, a), (_, b) in zip(int_layers(converted), int_layers(loaded)):
        state_a, state_b = a.state_dict(), b.state_dict()
        assert state_a.keys() == state_b.keys()
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a), name
        assert torch.equal(a.rotation, b.rotation)
    assert torch.equal(out_converted, out_loaded)
    assert float((out_loaded - fake).norm() / fake.norm()) < 1e-5


def test_header_and_storage(exported):
    qconfig, model, path = exported
    header = read_int_header(path)
    assert header["method"] == "qvdit"
    assert header["bits"] == {"weight": [4], "act": [8]}
    assert header["granularity"] == {"weight": ["per_channel"], "act": ["per_token"]}
    assert header["config"]["weight"]["bits"] == 4 and header["model"]["info"] == INFO
    assert header["model"]["architecture_sha256"] == architecture_fingerprint(Toy())
    layer = header["layers"]["attn_temp"]
    assert layer["container"] == "int4x2" and layer["num_frames"] == T and layer["rank_out"] == 1
    assert layer["rotation"] == "hadamard" and layer["smooth"]
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        assert handle.get_tensor("attn.qweight").dtype == torch.uint8
        assert handle.get_tensor("attn.qweight").shape == (48, 24)
    assert "attn_temp.frame_scale" in keys and "attn.post_a" in keys
    assert not any(k.startswith("_shared.") for k in keys)  # canonical Hadamards are regenerated


def test_non_canonical_rotation_is_stored_once(tmp_path):
    qconfig = config(balance={"method": "rotate"}, method="qvdit")
    model = calibrated(qconfig)
    rotation = random_hadamard(48, seed=7)
    for name in ("attn", "attn_temp", "mlp.0"):
        model.get_submodule(name).set_balance(rotation=rotation)
    init_weight_quantizers(model)
    path = export_int_model(model, tmp_path / "w.safetensors", qconfig)
    with safe_open(str(path), framework="pt") as handle:
        assert [k for k in handle.keys() if k.startswith("_shared.")] == ["_shared.rotation.0"]
    loaded = load_int_model(Toy(), path, qconfig)
    assert torch.equal(loaded.attn.rotation, rotation)
    assert read_int_header(path)["layers"]["mlp.2"]["rotation"] == "hadamard"  # K = 192 kept its own


def test_refuses_another_config(exported):
    _, _, path = exported
    with pytest.raises(IntWeightsError, match="weight.bits: file has 4, current has 8") as info:
        load_int_model(Toy(), path, config(weight={"bits": 8}), INFO)
    assert isinstance(info.value, QuantParamsError) and "made for another model or config" in str(info.value)


def test_refuses_another_model(exported):
    qconfig, _, path = exported
    with pytest.raises(IntWeightsError) as info:
        load_int_model(Toy(c=64), path, qconfig, {"hidden_size": 64, "depth": 1})
    message = str(info.value)
    assert "model_info.hidden_size: file has 48, current has 64" in message
    assert "attn.in_features: file has 48, current has 64" in message
    assert "architecture fingerprint differs" in message


def test_refuses_missing_and_foreign_files(exported, tmp_path):
    _, model, path = exported
    with pytest.raises(IntWeightsError, match="integer weights not found"):
        load_int_model(Toy(), tmp_path / "absent.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(IntWeightsError, match="not a safetensors"):
        read_int_header(tmp_path / "junk.safetensors")
    from qdiff.api import save_quant_params

    save_quant_params(model, config(), tmp_path / "qp.safetensors")
    with pytest.raises(IntWeightsError, match="not a qdiff integer-weights file"):
        read_int_header(tmp_path / "qp.safetensors")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_int_model(model, path)


def test_export_refuses_folded_model(tmp_path):
    from qdiff.api import fold_model

    model = calibrated(config())
    fold_model(model)
    with pytest.raises(IntExportError, match="layer attn: the layer is folded"):
        export_int_model(model, tmp_path / "w.safetensors")
    assert not (tmp_path / "w.safetensors").exists()
