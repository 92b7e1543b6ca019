"""Rotary cos/sin caches for GroupQueryAttention (do_rotary=1), computed at conversion time.

The inverse frequencies follow transformers' ROPE_INIT_FUNCTIONS for the
types handled here ("default", "linear", "llama3", "longrope"). Only the first
rotary_dim = head_dim * partial_rotary_factor entries of a head rotate.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from .model import ConversionError, ModelConfig

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")


def rope_type(cfg: ModelConfig) -> str:
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    return "longrope" if kind == "su" else kind   # Phi-3's older name for the same scaling


def rotary_dim(cfg: ModelConfig) -> int:
    return int(cfg.head_dim * cfg.partial_rotary_factor)


def _longrope_orig(cfg: ModelConfig) -> int:
    return int((cfg.rope_scaling or {}).get("original_max_position_embeddings") or cfg.max_position_embeddings)


def check_rope(cfg: ModelConfig, max_context: int) -> None:
    """Refuse rope settings the static caches cannot reproduce (one line)."""
    kind = rope_type(cfg)
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ConversionError(f"unsupported rope_scaling type {kind!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if not 0.0 < cfg.partial_rotary_factor <= 1.0 or rotary_dim(cfg) % 2:
        raise ConversionError(f"partial_rotary_factor {cfg.partial_rotary_factor} gives an odd or empty rotary "
                              f"part of head_dim {cfg.head_dim}")
    if kind == "longrope":
        rs = cfg.rope_scaling
        for key in ("short_factor", "long_factor"):
            if len(rs.get(key) or []) != rotary_dim(cfg) // 2:
                raise ConversionError(f"longrope {key} must have {rotary_dim(cfg) // 2} entries")
        # transformers switches every position to long_factor once a sequence passes the original
        # context, which a cache computed once cannot do: keep max_context within it
        if max_context > _longrope_orig(cfg):
            raise ConversionError(f"longrope rope scaling: max_context {max_context} exceeds the original context "
                                  f"{_longrope_orig(cfg)}; convert with --max-context {_longrope_orig(cfg)} or less")


def inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [rotary_dim/2] (float64), rope_scaling applied."""
    dim = rotary_dim(cfg)
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
    if kind == "longrope":
        # transformers computes base ** (i/dim) in float32 here; so does this, to match its bits
        exps = (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
        base = np.float32(cfg.rope_theta) ** exps
        return (1.0 / (np.asarray(rs["short_factor"], np.float32) * base)).astype(np.float64)
    raise ConversionError(f"unsupported rope_scaling type {kind!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def attention_factor(cfg: ModelConfig) -> float:
    """The factor transformers multiplies cos and sin by (longrope; 1 for the others)."""
    if rope_type(cfg) != "longrope":
        return 1.0
    rs = cfg.rope_scaling
    if rs.get("attention_factor") is not None:
        return float(rs["attention_factor"])
    orig = _longrope_orig(cfg)
    factor = cfg.max_position_embeddings / orig if rs.get("original_max_position_embeddings") else float(
        rs.get("factor") or 1.0)
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))


def cos_sin_cache(cfg: ModelConfig, max_context: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float32 [max_context, head_dim/2] (rotate_half convention).

    With partial rotary the columns past rotary_dim/2 hold cos=1, sin=0: the graph reorders each
    q/k head so that its pass-through entries sit in those pairs (onnx_writer.rotary_row_order).
    """
    check_rope(cfg, max_context)
    angles = np.arange(max_context, dtype=np.float64)[:, None] * inv_freq(cfg)[None, :]
    if rope_type(cfg) == "longrope":   # transformers: float32 angles, then cos * factor
        ang32 = np.arange(max_context, dtype=np.float32)[:, None] * inv_freq(cfg).astype(np.float32)[None, :]
        f = np.float32(attention_factor(cfg))
        cos, sin = np.cos(ang32) * f, np.sin(ang32) * f
    else:
        cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    rest = cfg.head_dim // 2 - cos.shape[1]
    if rest:
        cos = np.pad(cos, ((0, 0), (0, rest)), constant_values=1.0)
        sin = np.pad(sin, ((0, 0), (0, rest)))
    return cos, sin


def local_config(cfg: ModelConfig) -> ModelConfig:
    """The rope settings of sliding layers: Gemma 3 gives them their own base, unscaled."""
    if cfg.rope_local_theta is None:
        return cfg
    return replace(cfg, rope_theta=cfg.rope_local_theta, rope_scaling=None)
