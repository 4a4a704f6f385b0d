"""qdiff: post-training quantization of diffusion transformers (see README.md).

Top-level shortcuts are imported lazily, so ``import qdiff.<submodule>`` stays light:
    qdiff.compile_model(model)   # torch.compile for inference (qdiff.api.compile_model)
"""

_LAZY = {"compile_model": "qdiff.api", "prepare_compile": "qdiff.api", "quantize_model": "qdiff.api"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qdiff' has no attribute {name!r}")
