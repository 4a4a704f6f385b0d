"""Tests for qdiff/quantizers/config.py: defaults, dict round trips, validation messages."""
import dataclasses

import pytest

from qdiff.quantizers.config import ActQuantConfig, BalanceConfig, TQEConfig, WeightQuantConfig

ALL_CONFIGS = [WeightQuantConfig, ActQuantConfig, TQEConfig, BalanceConfig]


@pytest.mark.parametrize("cls", ALL_CONFIGS)
def test_defaults_round_trip_through_dict(cls):
    cfg = cls()
    assert cls.from_dict(cfg.to_dict()) == cfg


def test_non_default_round_trip():
    cfg = WeightQuantConfig(bits=3, symmetric=True, group_size=64, init="min_max", learnable_delta=False)
    assert WeightQuantConfig.from_dict(cfg.to_dict()) == cfg
    act = ActQuantConfig(bits=6, mode="dynamic_per_token", reference_token_grouping=True)
    assert ActQuantConfig.from_dict(act.to_dict()) == act


def test_defaults_match_papers():
    assert WeightQuantConfig().init == "grid_search_lp" and WeightQuantConfig().group_size is None
    assert ActQuantConfig().mode == "dynamic_per_token"
    assert (TQEConfig().rank, TQEConfig().rank_out) == (32, 1)
    assert BalanceConfig().momentum == 0.95


@pytest.mark.parametrize("cls", ALL_CONFIGS)
def test_unknown_key_is_named(cls):
    with pytest.raises(ValueError, match="n_bits"):
        cls.from_dict({"n_bits": 4})


@pytest.mark.parametrize(
    "cls, kwargs, field",
    [
        (WeightQuantConfig, {"bits": 1}, "bits"),
        (WeightQuantConfig, {"bits": 9}, "bits"),
        (WeightQuantConfig, {"bits": 4.0}, "bits"),
        (WeightQuantConfig, {"group_size": 0}, "group_size"),
        (WeightQuantConfig, {"init": "mse"}, "init"),
        (WeightQuantConfig, {"symmetric": "yes"}, "symmetric"),
        (ActQuantConfig, {"bits": 16}, "bits"),
        (ActQuantConfig, {"mode": "per_channel"}, "mode"),
        (ActQuantConfig, {"mode": "static_per_tensor", "reference_token_grouping": True}, "reference_token_grouping"),
        (TQEConfig, {"rank": -1}, "rank"),
        (TQEConfig, {"rank_out": -2}, "rank_out"),
        (BalanceConfig, {"method": "quarot"}, "method"),
        (BalanceConfig, {"alpha": 1.5}, "alpha"),
        (BalanceConfig, {"momentum": 1.0}, "momentum"),
    ],
)
def test_validation_names_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        cls(**kwargs)


def test_error_lists_allowed_values():
    with pytest.raises(ValueError, match="grid_search_lp"):
        WeightQuantConfig(init="mse")


def test_rank_zero_is_allowed():
    assert TQEConfig(rank=0, rank_out=0).rank == 0


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        WeightQuantConfig().bits = 4
