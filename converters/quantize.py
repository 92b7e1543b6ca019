"""Round-to-nearest blockwise quantization in onnxruntime's MatMulNBits layout.

The layout (docs/model-folder.md, "Linear"): a weight W [N, K] is cut along K
into blocks of `block_size`; each (row, block) has one float32 scale and, when
asymmetric, one zero point. Dequantized: W[n, k] = (q[n, k] - zp[n, blk]) * scale[n, blk].

Zero points are integers (uint8, packed like the codes) or floats (float32,
one per block, MatMulNBits' zero points of the scales' type). A float zero
point places the grid anywhere: it holds llama.cpp's Q4_1/Q4_K blocks
(d*q + m) exactly. edgeact reads such a block as q*scale + minimum with
minimum = -zp*scale (the value of code 0), rounded to 11 (fp16) or 17 significant
bits when every minimum of the weight lies within one float32 ulp of such a value
(block_minimums): quantizers store minimums of that precision, and a float32
zero point can always come within an ulp of one but only sometimes hit it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK_SIZES = (16, 32, 64, 128)


@dataclass
class QuantizedWeight:
    B: np.ndarray                  # uint8 [N, blocks, block_size * bits / 8]
    scales: np.ndarray             # float32 [N * blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(blocks/2)] (4-bit) or [N, blocks] (8-bit); None = symmetric;
    #                                 or float32 [N * blocks] (float zero points)
    K: int
    N: int
    bits: int
    block_size: int

    @property
    def blocks(self) -> int:
        return -(-self.K // self.block_size)

    @property
    def float_zero_points(self) -> bool:
        return self.zero_points is not None and self.zero_points.dtype == np.float32

    @property
    def nbytes(self) -> int:
        return self.B.nbytes + self.scales.nbytes + (0 if self.zero_points is None else self.zero_points.nbytes)

    @property
    def file_nbytes(self) -> int:
        """Bytes in a model folder: the writer stores scales as fp16 where fp16 holds them all, and float
        zero points as fp16 negated minimums where half_minimums finds them (onnx_writer.half_init /
        zero_points)."""
        half = holds_in_fp16(self.scales)
        zp = 0 if self.zero_points is None else self.zero_points.nbytes
        if half_minimums(self) is not None:
            zp //= 2
        return self.B.nbytes + self.scales.nbytes // (2 if half else 1) + zp


def half_minimums(qw: QuantizedWeight) -> np.ndarray | None:
    """Float zero points as the writer stores them when it can: the negated block minimums in fp16
    [N * blocks], computed in the graph as Div(-minimum, scale) over fp16 scales. That needs scales
    and minimums that are fp16 values, no zero scale, and the quotient z = fl(-m/d) rounding back to
    each m through block_minimums (-z*d is within one float32 ulp of m, so it always has; checked all
    the same). None when the weight has no float zero points or they cannot be stored so."""
    if not qw.float_zero_points or not np.all(qw.scales != 0) or not holds_in_fp16(qw.scales):
        return None
    m = block_minimums(qw).reshape(-1)
    with np.errstate(over="ignore"):
        neg = (-m).astype(np.float16)
    if not np.array_equal(neg.astype(np.float32), -m):
        return None
    zp = (neg.astype(np.float32) / qw.scales).astype(np.float32)
    again = QuantizedWeight(qw.B, qw.scales, zp, qw.K, qw.N, qw.bits, qw.block_size)
    return neg if np.array_equal(block_minimums(again).reshape(-1), m) else None


def holds_in_fp16(a: np.ndarray) -> bool:
    """Every value of float32 `a` is an fp16 value (so an fp16 copy loses nothing)."""
    a = np.ascontiguousarray(a, np.float32)
    with np.errstate(over="ignore"):
        h = a.astype(np.float16)
    return bool(np.array_equal(h.astype(np.float32).view(np.uint32), a.view(np.uint32)))


def _check(bits: int, block_size: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")


FP16_NORMAL_MIN, FP16_MAX = 6.103515625e-05, 65504.0


def fp16_exact(scale: np.ndarray) -> np.ndarray:
    """Scales rounded up to an fp16 value (still stored as float32) where fp16
    holds them at full relative precision. The runtime keeps a weight's scales
    as fp16 when all are exact, reading 10% fewer bytes per decode step.
    Rounding up (at most 2^-10 relative) keeps the whole block range
    representable, so no code is clipped."""
    scale = np.asarray(scale, dtype=np.float32)
    ok = (scale >= FP16_NORMAL_MIN) & (scale < FP16_MAX)
    h = np.where(ok, scale, 0).astype(np.float16)
    # positive halves: the next one up is the next bit pattern
    h = np.where(h.astype(np.float32) < scale, (h.view(np.uint16) + 1).view(np.float16), h)
    return np.where(ok, h.astype(np.float32), scale).astype(np.float32)


def fp16_nearest(x: np.ndarray) -> np.ndarray:
    """x rounded to the nearest fp16 value (kept as float32)."""
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def zero_points_for(minimum: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Float32 zero points zp with -zp*scale (float32) as close to `minimum` as float32 allows:
    equal where some float32 zp hits it, else one ulp away (block_minimums rounds it back
    when the minimums are fp16 values). zp = 0 where the scale is 0 (the block is all zero)."""
    minimum = np.asarray(minimum, np.float32)
    scale = np.asarray(scale, np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        zp = np.where(scale != 0, -minimum / scale, 0).astype(np.float32)
        best, err = zp, np.abs((zp * scale).astype(np.float64) + minimum)
        for direction in (np.inf, -np.inf):
            c = zp
            for _ in range(3):
                c = np.nextafter(c, np.float32(direction)).astype(np.float32)
                e = np.abs((c * scale).astype(np.float64) + minimum)
                better = (e < err) & (scale != 0)
                best, err = np.where(better, c, best), np.where(better, e, err)
    return best.astype(np.float32)


def float_minimum_override(src, names, group_size: int) -> dict:
    """linear_override loaders rounding each named weight of src to nearest at int4 with float zero
    points (one tensor read and packed at a time, when the writer reaches it)."""
    return {n: (lambda k=n: quantize_blockwise(src.load(k), 4, group_size, float_zero_points=True)) for n in names}


def quantize_blockwise(w: np.ndarray, bits: int = 4, block_size: int = 32, symmetric: bool = False,
                       float_zero_points: bool = False) -> QuantizedWeight:
    """Quantize W [N, K] (float) to `bits` per weight, one scale (and zero point) per block of K.

    float_zero_points: the grid spans each block's [min, max] exactly (fp16 scale and minimum,
    float32 zero point) instead of an integer zero point's range widened to include 0."""
    _check(bits, block_size)
    if float_zero_points and symmetric:
        raise ValueError("float zero points are for asymmetric weights; symmetric has none")
    if float_zero_points and bits != 4:
        raise ValueError("float zero points are for 4-bit weights (onnxruntime's CPU MatMulNBits has no 8-bit ones)")
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight [N, K], got shape {w.shape}")
    N, K = w.shape
    blocks = -(-K // block_size)
    pad = blocks * block_size - K
    if pad:
        w = np.pad(w, ((0, 0), (0, pad)))
    wb = w.reshape(N, blocks, block_size)
    qmax = (1 << bits) - 1

    if float_zero_points:
        minimum = fp16_nearest(wb.min(axis=2))
        scale = fp16_exact((wb.max(axis=2) - minimum) / qmax)
        q = np.clip(np.rint((wb - minimum[..., None]) / np.where(scale > 0, scale, 1)[..., None]), 0, qmax)
        return pack_codes(q.astype(np.uint8), scale, minimum, bits, block_size, K)
    if symmetric:
        # Zero point is implied (8 / 128); use ±(2^(bits-1) - 1) so both signs round within scale/2.
        mid = 1 << (bits - 1)
        scale = fp16_exact(np.abs(wb).max(axis=2) / (mid - 1))
        zp = np.full(scale.shape, mid, dtype=np.float32)
    else:
        # Include 0 in the range so the integer zero point lies in [0, qmax].
        lo = np.minimum(wb.min(axis=2), 0.0)
        hi = np.maximum(wb.max(axis=2), 0.0)
        scale = fp16_exact((hi - lo) / qmax)
        with np.errstate(divide="ignore", invalid="ignore"):
            zp = np.where(scale > 0, np.clip(np.rint(-lo / scale), 0, qmax), 0.0).astype(np.float32)
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
    q = np.clip(np.rint(wb * inv[..., None]) + zp[..., None], 0, qmax).astype(np.uint8)

    if bits == 4:
        B = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    else:
        B = q
    zero_points = None
    if not symmetric:
        zq = zp.astype(np.uint8)
        if bits == 4:
            if blocks % 2:
                zq = np.pad(zq, ((0, 0), (0, 1)))
            zq = zq[:, 0::2] | (zq[:, 1::2] << 4)
        zero_points = np.ascontiguousarray(zq)
    return QuantizedWeight(np.ascontiguousarray(B), scale.reshape(-1), zero_points, K, N, bits, block_size)


def pack_codes(q: np.ndarray, scale: np.ndarray, minimum: np.ndarray | None, bits: int, block_size: int,
               K: int) -> QuantizedWeight:
    """A QuantizedWeight from codes q [N, blocks, block_size] (uint8, 0..2^bits-1) and per-block
    float scales [N, blocks]: W = q*scale + minimum with float zero points, or, when minimum is
    None, symmetric (W = (q - 2^(bits-1))*scale). Codes past K should hold the block's zero."""
    _check(bits, block_size)
    q = np.asarray(q, np.uint8)
    N, blocks, _ = q.shape
    B = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8) if bits == 4 else q
    scale = np.asarray(scale, np.float32).reshape(N, blocks)
    zp = None
    if minimum is not None and bits != 4:
        raise ValueError("float zero points are for 4-bit weights (onnxruntime's CPU MatMulNBits has no 8-bit ones)")
    if minimum is not None:
        minimum = np.asarray(minimum, np.float32).reshape(N, blocks)
        # a constant block (scale 0, minimum m): codes 0 on a step of |m| place it exactly (zp = -sign m)
        const = (scale == 0) & (minimum != 0)
        if const.any():
            q = np.where(const[..., None], 0, q).astype(np.uint8)
            B = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8) if bits == 4 else q
            scale = np.where(const, np.abs(minimum), scale)
        zp = zero_points_for(minimum, scale).reshape(-1)
    return QuantizedWeight(np.ascontiguousarray(B), scale.reshape(-1).copy(), zp, K, N, bits, block_size)


MINIMUM_BITS = (11, 17)   # fp16's significand; a K-quant's fp16 dmin times a 6-bit multiplier


def round_significand(x: np.ndarray, bits: int) -> np.ndarray:
    """float32 x rounded (half away from zero) to `bits` significant bits."""
    drop = 24 - bits
    u = np.asarray(x, np.float32).view(np.uint32)
    return ((u + np.uint32(1 << (drop - 1))) & np.uint32(~((1 << drop) - 1) & 0xFFFFFFFF)).view(np.float32)


def block_minimums(qw: QuantizedWeight) -> np.ndarray:
    """Float zero points' block minimums [N, blocks] as edgeact (numpy and the native runtime) applies
    them: m = -zp*scale in float32, then, for the first b in MINIMUM_BITS with every m of the weight
    within one float32 ulp of its b-bit rounding, that rounding (the minimums a quantizer stored;
    see the module docstring)."""
    m = -(qw.zero_points.reshape(qw.N, qw.blocks) * qw.scales.reshape(qw.N, qw.blocks))
    ulp = np.spacing(np.abs(m))
    for bits in MINIMUM_BITS:
        r = round_significand(m, bits)
        if np.all(np.abs(r - m) <= ulp):
            return r
    return m.astype(np.float32)


def unpack_codes(qw: QuantizedWeight) -> np.ndarray:
    """The integer codes q [N, blocks, block_size] (uint8)."""
    if qw.bits == 4:
        q = np.empty((qw.N, qw.blocks, qw.block_size), dtype=np.uint8)
        q[..., 0::2] = qw.B & 0x0F
        q[..., 1::2] = qw.B >> 4
        return q
    return qw.B


def zero_point_values(qw: QuantizedWeight) -> np.ndarray:
    """Zero points as float32 [N, blocks] (implied ones for symmetric weights)."""
    if qw.zero_points is None:
        return np.full((qw.N, qw.blocks), 1 << (qw.bits - 1), dtype=np.float32)
    if qw.float_zero_points:
        return qw.zero_points.reshape(qw.N, qw.blocks)
    if qw.bits == 4:
        z = np.empty((qw.N, qw.zero_points.shape[1] * 2), dtype=np.uint8)
        z[:, 0::2] = qw.zero_points & 0x0F
        z[:, 1::2] = qw.zero_points >> 4
        return z[:, : qw.blocks].astype(np.float32)
    return qw.zero_points.astype(np.float32)


def dequantize(qw: QuantizedWeight) -> np.ndarray:
    """The numpy reference: W [N, K] float32 as MatMulNBits sees it."""
    q = unpack_codes(qw).astype(np.float32)
    scales = qw.scales.reshape(qw.N, qw.blocks)
    if qw.float_zero_points:
        w = q * scales[..., None] + block_minimums(qw)[..., None]
    else:
        w = (q - zero_point_values(qw)[..., None]) * scales[..., None]
    return w.reshape(qw.N, -1)[:, : qw.K]
