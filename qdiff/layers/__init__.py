"""Quantized layer replacements."""
from qdiff.layers.quant_linear import QuantLinear

__all__ = ["QuantLinear"]
