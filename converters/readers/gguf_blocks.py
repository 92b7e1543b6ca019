"""llama.cpp's quantized blocks → MatMulNBits weights, without a second rounding where the grid fits.

Each GGUF block type stores codes and per-block parameters; this module takes
them apart (codes in element order, one scale and one minimum per 32 weights)
and packs them as converters/quantize.py's QuantizedWeight:

  Q4_0  d*(q-8)                 → int4 g32 symmetric                exact
  Q4_1  d*q + m                 → int4 g32, float zero point        exact
  Q4_K  d*sc*q - dmin*mn        → int4 g32, float zero point        exact (float32 scale)
  Q5_0  d*(q-16)                → int8 g32 symmetric                exact
  Q8_0  d*q                     → int8 g32 symmetric                exact
  Q6_K  d*sc*(q-32), scale per 16 → int8 g32 symmetric: exact where a block's two
        sub-scales share a factor small enough, otherwise re-rounded to 8 bits
  other types (Q5_1, Q5_K: onnxruntime has no 8-bit float zero points): dequantized by the
        gguf package and re-rounded (int4 g32 with a float zero point up to 4.5 bits per
        weight, int8 g32 with an integer zero point above)

"Exact" is checked per tensor against gguf.quants' own dequantization (import_weight
reports the blocks that differ), so a wrong layout here cannot pass silently.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..quantize import QuantizedWeight, dequantize, pack_codes, quantize_blockwise

QK = 32


@dataclass
class Imported:
    qw: QuantizedWeight
    source_type: str
    exact: bool
    note: str | None = None   # what was re-rounded, for edgeact.json


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)[..., 0]


def _nibbles_split(qs: np.ndarray) -> np.ndarray:
    """16 bytes → 32 codes: element j in byte j's low nibble, element j+16 in its high nibble."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q4_0(b):
    return _nibbles_split(b[..., 2:18]), _f16(b[..., 0:2]), None


def _q4_1(b):
    return _nibbles_split(b[..., 4:20]), _f16(b[..., 0:2]), _f16(b[..., 2:4])


def _q5_low_high(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(qh).view(np.uint32)[..., :1] >> np.arange(32, dtype=np.uint32)
    return _nibbles_split(qs) | (((bits & 1).astype(np.uint8)) << 4)


def _q5_0(b):
    return _q5_low_high(b[..., 2:6], b[..., 6:22]), _f16(b[..., 0:2]), None


def _q8_0(b):
    return (b[..., 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8), _f16(b[..., 0:2]), None


def _k_scale_min(scales: np.ndarray):
    """Q4_K/Q5_K's 12 bytes → 8 six-bit scales and 8 six-bit minimums."""
    d, m, md = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q4_k(b):
    """Super-blocks of 256 (8 sub-blocks of 32) → codes [..., 8, 32], scale and minimum [..., 8]."""
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = _k_scale_min(b[..., 4:16])
    qs = b[..., 16:144].reshape(*b.shape[:-1], 4, 32)
    codes = np.stack([qs & 0x0F, qs >> 4], axis=-2).reshape(*b.shape[:-1], 8, 32)   # low nibbles first
    return codes, d[..., None] * sc, -(dmin[..., None] * mn)


def _q6_k(b):
    """Super-blocks of 256 → signed codes [..., 16, 16] (-32..31), int8 sub-scales [..., 16] and d [...]."""
    lead = b.shape[:-1]
    lo = (b[..., 0:128].reshape(*lead, 2, 1, 64) >> np.array([0, 4], np.uint8)[:, None]) & 0x0F
    hi = (b[..., 128:192].reshape(*lead, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
    q = (lo.reshape(*lead, 8, 32) | (hi.reshape(*lead, 8, 32) << 4)).astype(np.int32) - 32
    return q.reshape(*lead, 16, 16), b[..., 192:208].view(np.int8).astype(np.int32), _f16(b[..., 208:210])


# type name → (decoder, bits of our format, elements per source block)
_EXACT = {"Q4_0": (_q4_0, 4, 32), "Q4_1": (_q4_1, 4, 32), "Q5_0": (_q5_0, 8, 32), "Q8_0": (_q8_0, 8, 32),
          "Q4_K": (_q4_k, 4, 256)}
FLOAT_TYPES = ("F32", "F16", "BF16")


def _gguf_dequant(data: np.ndarray, qtype) -> np.ndarray:
    from gguf.quants import dequantize as gguf_dequantize

    return gguf_dequantize(data, qtype).astype(np.float32, copy=False)


def _q6_k_to_int8(blocks: np.ndarray, N: int, K: int) -> tuple[QuantizedWeight, int]:
    """Q6_K as int8 g32 symmetric: a 32-block's two sub-scales d*s1, d*s2 are multiples of d*g
    (g = gcd(|s1|, |s2|)), exact with codes (s_i/g)*q when those fit ±127; elsewhere the block
    is re-rounded to the least-error 8-bit grid (scale max|w|/127). Returns the weight and the
    count of re-rounded blocks."""
    q, sc, d = _q6_k(blocks.reshape(N, K // 256, -1))
    q, sc = q.reshape(N, K // QK, 2, 16), sc.reshape(N, K // QK, 2)
    d32 = np.repeat(d, 8, axis=1)                                    # [N, K/32]
    g = np.gcd(np.abs(sc[..., 0]), np.abs(sc[..., 1]))
    g = np.maximum(g, 1)
    codes = ((sc // g[..., None])[..., None] * q).reshape(N, K // QK, QK)
    exact = np.abs(codes).max(-1) <= 127
    w = ((d32[..., None] * sc.astype(np.float32))[..., None] * q).reshape(N, K // QK, QK)
    rscale = (np.abs(w).max(-1) / 127).astype(np.float32)
    rcodes = np.rint(w / np.where(rscale > 0, rscale, 1)[..., None])
    codes = np.where(exact[..., None], codes, rcodes)
    scale = np.where(exact, (d32 * g).astype(np.float32), rscale)
    qw = pack_codes(np.clip(codes + 128, 0, 255).astype(np.uint8), scale, None, 8, QK, K)
    return qw, int((~exact).sum())


def import_weight(data: np.ndarray, qtype, shape: tuple[int, int], row_order: np.ndarray | None = None,
                  verify: bool = True) -> Imported | None:
    """GGUF tensor bytes [N, row_bytes] of type `qtype` (gguf.GGMLQuantizationType) and numpy shape
    (N, K) → an Imported weight, or None for float types (they stay float). `row_order` reorders
    rows (q/k's rotary permutation). With `verify`, the result is compared with gguf's own
    dequantization and a tensor that differs anywhere is reported as not exact."""
    name = qtype.name
    if name in FLOAT_TYPES:
        return None
    N, K = shape
    blocks = np.ascontiguousarray(data).reshape(N, -1)
    if row_order is not None:
        blocks = blocks[row_order]
    note = None
    if name in _EXACT and K % _EXACT[name][2] == 0:
        decode, bits, per = _EXACT[name]
        codes, scale, minimum = decode(blocks.reshape(N, K // per, -1))
        codes = codes.reshape(N, K // QK, QK)
        scale = np.asarray(scale, np.float32).reshape(N, K // QK)
        minimum = None if minimum is None else np.asarray(minimum, np.float32).reshape(N, K // QK)
        if minimum is None and bits == 4:
            qw = pack_codes(codes, scale, None, 4, QK, K)
        elif minimum is None:
            qw = pack_codes(codes if name == "Q8_0" else codes.astype(np.int16) + 112, scale, None, 8, QK, K)
        else:
            qw = pack_codes(codes, scale, minimum, bits, QK, K)
    elif name == "Q6_K" and K % 256 == 0:
        qw, rerounded = _q6_k_to_int8(blocks, N, K)
        if rerounded:
            note = (f"Q6_K → int8 g32: {rerounded} of {N * K // QK} blocks re-rounded to 8 bits "
                    "(their two 16-weight sub-scales share no common step)")
    else:
        from gguf import GGML_QUANT_SIZES

        per, nbytes = GGML_QUANT_SIZES[qtype]
        bits = 4 if nbytes * 8 / per <= 4.5 else 8
        w = _gguf_dequant(blocks, qtype).reshape(N, K)
        qw = quantize_blockwise(w, bits, QK, float_zero_points=bits == 4)
        return Imported(qw, name, False, f"{name} → int{bits} g32: re-rounded (no exact {name} grid in MatMulNBits)")
    if not verify:
        return Imported(qw, name, note is None, note)
    ref = _gguf_dequant(blocks, qtype).reshape(N, K)
    got = dequantize(qw)
    diff = got != ref
    if diff.any() and note is None:
        bad = int(diff.reshape(N, K // QK, QK).any(-1).sum())
        err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))
        note = (f"{name} → int{qw.bits} g32: {bad} of {N * K // QK} blocks differ from gguf's values "
                f"(largest difference {err:.1e} of the tensor's range; float32 cannot place those minimums)")
    return Imported(qw, name, not diff.any(), note)
