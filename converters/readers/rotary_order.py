"""Row order of q/k projections: interleaved rotary pairs → Hugging Face rotate_half order.

GGUF (llama.cpp) and llama2.c rotate adjacent pairs (x0,x1),(x2,x3)...; transformers
rotates the two halves of each head. The same linear map expressed in the other
convention only reorders each head's output rows.
"""
from __future__ import annotations

import numpy as np


def interleaved_to_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder rows of a [n_heads*head_dim, ...] weight (or bias) from interleaved to rotate_half order."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"cannot split {rows} rows into {n_heads} heads of even size")
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
