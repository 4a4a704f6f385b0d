"""Fake-quantization configs, math and quantizer modules."""
from qdiff.quantizers.config import ActQuantConfig, BalanceConfig, TQEConfig, WeightQuantConfig
from qdiff.quantizers.uniform import (
    DynamicActQuantizer,
    FP8ActQuantizer,
    StaticActQuantizer,
    WeightQuantizer,
    fake_quant,
    grid_search_lp_channelwise,
    min_max_channelwise,
    quant_range,
    round_ste,
)

__all__ = [
    "ActQuantConfig",
    "BalanceConfig",
    "DynamicActQuantizer",
    "FP8ActQuantizer",
    "StaticActQuantizer",
    "TQEConfig",
    "WeightQuantConfig",
    "WeightQuantizer",
    "fake_quant",
    "grid_search_lp_channelwise",
    "min_max_channelwise",
    "quant_range",
    "round_ste",
]
