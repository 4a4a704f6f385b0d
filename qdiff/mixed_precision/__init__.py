"""Mixed precision: per-layer bit plans and floating-point exclusions (METHOD.md §3)."""
from qdiff.mixed_precision.plan import (
    FP_BITS,
    BitPlan,
    is_fp,
    load_bit_plan,
    load_fp_layers,
    normalize_layer_name,
)

__all__ = ["FP_BITS", "BitPlan", "is_fp", "load_bit_plan", "load_fp_layers", "normalize_layer_name"]
