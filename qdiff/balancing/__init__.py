"""Channel balancing: static smoothing scales and Hadamard rotations (METHOD.md §6)."""
from qdiff.balancing.hadamard import hadamard, hadamard_factorization, random_hadamard, supported_base_orders
from qdiff.balancing.smooth import ChannelStats, smooth_scales

__all__ = [
    "ChannelStats",
    "hadamard",
    "hadamard_factorization",
    "random_hadamard",
    "smooth_scales",
    "supported_base_orders",
]
