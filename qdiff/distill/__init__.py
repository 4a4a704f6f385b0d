"""Distillation losses for quantized video diffusion models."""
from qdiff.distill.tmd import distill_loss, frame_similarity, tmd_loss

__all__ = ["distill_loss", "frame_similarity", "tmd_loss"]
