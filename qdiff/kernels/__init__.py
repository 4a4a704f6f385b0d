"""GPU kernels behind checked wrappers, each with a pure-PyTorch reference beside it.

Triton is imported lazily: on a machine without CUDA/Triton every op falls back to its reference.
"""
