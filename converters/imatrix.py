"""Importance-weighted search of each block's scale and minimum (the idea of llama.cpp's imatrix
quantization, `--method imatrix`), for int4 with float zero points.

Round-to-nearest spans each block's [min, max] and rounds every weight alike. Here a weight's
error counts in proportion to E[x_k^2], the mean square of the input channel it multiplies on
calibration text (what the output error sum_t (x_t . dw)^2 weighs it by, cross terms aside).
Per block, a few grid steps around (max-min)/15 are tried; for each, codes are rounded and the
weighted least-squares scale and minimum for those codes are solved in closed form (rounded to
fp16, then the codes rounded again); the candidate with the lowest weighted error is kept,
round-to-nearest's own grid among them, so the search never loses to it on its objective.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .quantize import FP16_MAX, QuantizedWeight, fp16_exact, fp16_nearest, pack_codes
from .threads import physical_cores

STEPS = np.arange(-10, 11) * 0.1   # grid offsets in code units around 15 codes over the range
ROWS = 256   # rows per task: a slice's buffers stay in cache; smaller slices pay numpy's per-call cost


# The search's passes over [rows, blocks, group] run in float32 into buffers the caller reuses (out=,
# r=, t=); per-block sums and the least-squares solve in float64. Scales and minimums are fp16 values,
# exact in float32.
def _codes(wb, d, m, qmax, out=None):
    inv = np.where(d > 0, 1.0 / np.where(d > 0, d, 1), 0).astype(wb.dtype)
    q = np.subtract(wb, m.astype(wb.dtype)[..., None], out=out)
    q *= inv[..., None]
    np.rint(q, out=q)
    return np.clip(q, 0, qmax, out=q)


def _error(wb, wt, d, m, q, r=None, t=None):
    """Per block, sum of wt·r² with r = q·d + m - wb."""
    r = np.multiply(q, d.astype(wb.dtype)[..., None], out=r)
    r += m.astype(wb.dtype)[..., None]
    r -= wb
    t = np.multiply(wt, r, out=t)
    t *= r
    return t.sum(-1, dtype=np.float64)


def quantize_weighted(w: np.ndarray, importance: np.ndarray, bits: int = 4, group: int = 32) -> QuantizedWeight:
    """W [N, K] to `bits` (4) with float zero points, scale and minimum per block chosen by the
    importance-weighted error; importance [K] >= 0 (E[x_k^2] of the input)."""
    if bits != 4:
        raise ValueError("the weighted search writes float zero points, which are 4-bit only")
    w = np.asarray(w, np.float32)
    N, K = w.shape
    blocks = -(-K // group)
    pad = blocks * group - K
    imp = np.asarray(importance, np.float64).reshape(-1)
    if imp.shape[0] != K:
        raise ValueError(f"importance has {imp.shape[0]} entries for K={K}")
    imp = np.maximum(imp, 0) + 1e-12 * max(float(imp.max(initial=0.0)), 1e-30)   # every weight counts a little
    wt = np.pad(imp, (0, pad)).reshape(1, blocks, group).astype(np.float32)   # padding weighs nothing
    # Rows are searched independently: slices of ROWS rows over the physical cores, in threads
    # (numpy's element-wise passes and sums release the GIL), with the same bits as one pass over all.
    parts = np.array_split(w, max(1, N // ROWS))   # views of consecutive rows
    with ThreadPoolExecutor(min(physical_cores(), len(parts))) as pool:
        found = list(pool.map(lambda rows: _search(rows, wt, pad, group, bits), parts))
    q, d, m = (np.concatenate(x) for x in zip(*found))
    return pack_codes(q.astype(np.uint8), d.astype(np.float32), m.astype(np.float32), bits, group, K)


def _search(w: np.ndarray, wt: np.ndarray, pad: int, group: int, bits: int):
    """(codes, scale, minimum) per block of the rows w [n, K], by the weighted search."""
    N = w.shape[0]
    blocks = wt.shape[1]
    wb = np.pad(w, ((0, 0), (0, pad))).reshape(N, blocks, group)
    qmax = (1 << bits) - 1
    lo, hi = wb.min(-1), wb.max(-1)
    rng = hi - lo

    m0 = fp16_nearest(lo).astype(np.float64)
    d0 = fp16_exact((hi - m0) / qmax).astype(np.float64)
    best_q = _codes(wb, d0, m0, qmax)
    best_d, best_m = d0, m0
    best_e = _error(wb, wt, d0, m0, best_q)
    sw = wt.sum(-1, dtype=np.float64)
    wtwb = wt * wb   # the products every step reuses
    sx = wtwb.sum(-1, dtype=np.float64)
    shifted = wb - lo[..., None]
    q, r, t = np.empty_like(wb), np.empty_like(wb), np.empty_like(wb)
    with np.errstate(divide="ignore", invalid="ignore"):
        for step in STEPS:
            iscale = np.where(rng > 0, (qmax + step) / rng, 0).astype(np.float32)
            np.multiply(shifted, iscale[..., None], out=q)
            np.clip(np.rint(q, out=q), 0, qmax, out=q)
            sl = np.multiply(wt, q, out=t).sum(-1, dtype=np.float64)
            t *= q
            sl2 = t.sum(-1, dtype=np.float64)
            sxl = np.multiply(wtwb, q, out=t).sum(-1, dtype=np.float64)
            det = sw * sl2 - sl * sl
            ok = det > 0
            d = np.where(ok, (sw * sxl - sx * sl) / np.where(ok, det, 1), 0)
            m = np.where(ok, (sl2 * sx - sl * sxl) / np.where(ok, det, 1), lo)
            ok &= (d > 0) & (np.abs(m) < FP16_MAX)
            m = fp16_nearest(np.where(ok, m, 0)).astype(np.float64)
            d = fp16_exact(np.where(ok, d, 0)).astype(np.float64)
            _codes(wb, d, m, qmax, out=q)
            e = _error(wb, wt, d, m, q, r, t)
            better = ok & (e < best_e)
            best_e = np.where(better, e, best_e)
            best_d, best_m = np.where(better, d, best_d), np.where(better, m, best_m)
            np.copyto(best_q, q, where=better[..., None])
    return best_q, best_d, best_m


def imatrix_override(src, *, group_size: int = 32, calib_ids=None, calib_file=None, calib_tokens: int = 512,
                     progress: bool = True, model=None) -> tuple[dict, dict]:
    """linear_override loaders quantizing every decoder linear of src by quantize_weighted, with the
    input second moments measured once on calibration text (lm_head keeps the writer's default);
    model: the fp32 torch model of src, when the caller has built one."""
    from .calibration import calibration_ids
    from .mixed import _input_of, input_second_moments, linear_names
    from .torch_ref import build_torch_model

    if model is None:
        model = build_torch_model(src)
    if calib_ids is None:
        calib_ids = calibration_ids(src, model, text_file=calib_file, n_tokens=calib_tokens)
    moments = input_second_moments(model, calib_ids)
    del model
    override = {}
    for name in linear_names(src):
        if name == "lm_head.weight":
            continue
        override[name] = (lambda k=name, imp=moments[_input_of(name)]: quantize_weighted(src.load(k), imp, 4,
                                                                                         group_size))
    report = {"method": "imatrix", "calibration": {"tokens": int(np.asarray(calib_ids).size),
                                                   "source": str(calib_file) if calib_file else
                                                   "sampled from the fp32 model"},
              "objective": "per block, sum_k E[x_k^2] (w'-w)^2 over a grid of scales with least-squares "
                           "scale and minimum; float zero points"}
    return override, report
