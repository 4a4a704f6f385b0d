"""Model adapters: the few facts qdiff needs about a model family, kept out of the algorithms.

An adapter answers "how many temporal tokens does this linear see?" (None for ordinary layers).
A new model is a new adapter module plus an entry in `_ADAPTERS`, never a branch in the algorithms.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from qdiff.adapters import stdit


@dataclass(frozen=True)
class ModelAdapter:
    name: str
    num_frames_for: Callable[[str, nn.Module], "int | None"]  # (layer name, model) -> T or None


GENERIC = ModelAdapter("generic", lambda name, model: None)
_ADAPTERS = {
    "generic": GENERIC,
    # STDiT keeps its constructor arguments (input_size, patch_size, ...) in `model.config`.
    "stdit": ModelAdapter("stdit", lambda name, model: stdit.num_frames_for(name, model.config)),
}


def get_adapter(adapter: "str | ModelAdapter | None") -> ModelAdapter:
    """An adapter by name ('generic', 'stdit'), or pass one through; None means generic."""
    if adapter is None:
        return GENERIC
    if isinstance(adapter, ModelAdapter):
        return adapter
    if adapter not in _ADAPTERS:
        raise ValueError(f"adapter: unknown {adapter!r}; known: {sorted(_ADAPTERS)}")
    return _ADAPTERS[adapter]
