"""Real low-bit inference: integer weight export, the IntLinear layer, and packing (docs/int_kernels.md)."""
from qdiff.lowbit.export import (
    IntWeightsError,
    architecture_fingerprint,
    convert_to_int,
    export_int_model,
    int_layers,
    int_weight_bytes,
    load_int_model,
    read_int_header,
    set_int_backend,
    share_input_quantization,
)
from qdiff.lowbit.fused import fusable, quantize_gelu, quantize_layernorm_modulate, set_fusion
from qdiff.lowbit.int_linear import IntExportError, IntLinear, QuantizedInput, SharedInputQuant
from qdiff.lowbit.pack import pack_codes, pack_int4, unpack_codes, unpack_int4

__all__ = [
    "IntExportError",
    "IntLinear",
    "IntWeightsError",
    "QuantizedInput",
    "architecture_fingerprint",
    "convert_to_int",
    "export_int_model",
    "fusable",
    "int_layers",
    "int_weight_bytes",
    "load_int_model",
    "pack_codes",
    "pack_int4",
    "quantize_gelu",
    "quantize_layernorm_modulate",
    "read_int_header",
    "set_fusion",
    "set_int_backend",
    "share_input_quantization",
    "SharedInputQuant",
    "unpack_codes",
    "unpack_int4",
]
