"""Rotary cos/sin caches for GroupQueryAttention (do_rotary=1), computed at conversion time.

The inverse frequencies follow transformers' ROPE_INIT_FUNCTIONS for the
types handled here ("default", "linear", "llama3"); their attention factor is 1.
"""
from __future__ import annotations

import math

import numpy as np

from .model import ConversionError, ModelConfig

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_type(cfg: ModelConfig) -> str:
    rs = cfg.rope_scaling or {}
    return rs.get("rope_type", rs.get("type", "default"))


def inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim/2] (float64), rope_scaling applied."""
    dim = cfg.head_dim
    freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    kind = rope_type(cfg)
    rs = cfg.rope_scaling or {}
    if kind == "default":
        return freq
    if kind == "linear":
        return freq / float(rs["factor"])
    if kind == "llama3":
        factor = float(rs["factor"])
        low, high = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old_ctx = float(rs["original_max_position_embeddings"])
        wavelen = 2 * math.pi / freq
        scaled = np.where(wavelen > old_ctx / low, freq / factor, freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return np.where(medium, smoothed, scaled)
    raise ConversionError(f"unsupported rope_scaling type {kind!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def cos_sin_cache(cfg: ModelConfig, max_context: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float32 [max_context, head_dim/2] (rotate_half convention, shared by all layers)."""
    angles = np.arange(max_context, dtype=np.float64)[:, None] * inv_freq(cfg)[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
