"""Real low-bit inference: integer (and FP8) weight export, the IntLinear and FP8Linear layers, and packing
(docs/int_kernels.md)."""
from qdiff.lowbit.export import (
    IntWeightsError,
    architecture_fingerprint,
    convert_to_int,
    export_int_model,
    fp8_layers,
    int_layers,
    int_weight_bytes,
    load_int_model,
    lowbit_from_quant_linear,
    lowbit_layers,
    read_int_header,
    set_int_backend,
    share_input_quantization,
)
from qdiff.lowbit.fp8_linear import FP8Act, FP8Linear, fp8_gemm, fp8_gemm_reference, scaled_mm_supported
from qdiff.lowbit.fused import fusable, quantize_gelu, quantize_layernorm_modulate, quantize_residual, set_fusion
from qdiff.lowbit.int_linear import IntExportError, IntLinear, QuantizedInput, SharedInputQuant
from qdiff.lowbit.pack import pack_codes, pack_int4, unpack_codes, unpack_int4

__all__ = [
    "FP8Act",
    "FP8Linear",
    "IntExportError",
    "IntLinear",
    "IntWeightsError",
    "QuantizedInput",
    "architecture_fingerprint",
    "convert_to_int",
    "export_int_model",
    "fp8_gemm",
    "fp8_gemm_reference",
    "fp8_layers",
    "fusable",
    "int_layers",
    "int_weight_bytes",
    "load_int_model",
    "lowbit_from_quant_linear",
    "lowbit_layers",
    "pack_codes",
    "pack_int4",
    "quantize_gelu",
    "quantize_layernorm_modulate",
    "quantize_residual",
    "read_int_header",
    "scaled_mm_supported",
    "set_fusion",
    "set_int_backend",
    "share_input_quantization",
    "SharedInputQuant",
    "unpack_codes",
    "unpack_int4",
]
