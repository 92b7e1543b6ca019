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


def _codes(wb, d, m, qmax):
    inv = np.where(d > 0, 1.0 / np.where(d > 0, d, 1), 0)
    return np.clip(np.rint((wb - m[..., None]) * inv[..., None]), 0, qmax)


def _error(wb, wt, d, m, q):
    r = q * d[..., None] + m[..., None] - wb
    return (wt * r * r).sum(-1)


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
    wt = np.pad(imp, (0, pad)).reshape(1, blocks, group)   # padding weighs nothing
    # Rows are searched independently: a slice of them per physical core, in threads (numpy's
    # element-wise passes and sums release the GIL), with the same bits as one pass over all rows.
    parts = np.array_split(w, min(physical_cores(), max(1, N // 64)))   # views of consecutive rows
    with ThreadPoolExecutor(len(parts)) as pool:
        found = list(pool.map(lambda rows: _search(rows, wt, pad, group, bits), parts))
    q, d, m = (np.concatenate(x) for x in zip(*found))
    return pack_codes(q.astype(np.uint8), d.astype(np.float32), m.astype(np.float32), bits, group, K)


def _search(w: np.ndarray, wt: np.ndarray, pad: int, group: int, bits: int):
    """(codes, scale, minimum) per block of the rows w [n, K], by the weighted search."""
    N = w.shape[0]
    blocks = wt.shape[1]
    wb = np.pad(w, ((0, 0), (0, pad))).reshape(N, blocks, group).astype(np.float64)
    qmax = (1 << bits) - 1
    lo, hi = wb.min(-1), wb.max(-1)
    rng = hi - lo

    m0 = fp16_nearest(lo).astype(np.float64)
    d0 = fp16_exact((hi - m0) / qmax).astype(np.float64)
    best_q = _codes(wb, d0, m0, qmax)
    best_d, best_m = d0, m0
    best_e = _error(wb, wt, d0, m0, best_q)
    sw = wt.sum(-1)
    wtwb = wt * wb   # the products every step reuses (the same values and sums as computed in place)
    sx = wtwb.sum(-1)
    shifted = wb - lo[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        for step in STEPS:
            iscale = np.where(rng > 0, (qmax + step) / rng, 0)
            q = np.clip(np.rint(shifted * iscale[..., None]), 0, qmax)
            wq = wt * q
            sl, sl2 = wq.sum(-1), (wq * q).sum(-1)
            sxl = (wtwb * q).sum(-1)
            det = sw * sl2 - sl * sl
            ok = det > 0
            d = np.where(ok, (sw * sxl - sx * sl) / np.where(ok, det, 1), 0)
            m = np.where(ok, (sl2 * sx - sl * sxl) / np.where(ok, det, 1), lo)
            ok &= (d > 0) & (np.abs(m) < FP16_MAX)
            m = fp16_nearest(np.where(ok, m, 0)).astype(np.float64)
            d = fp16_exact(np.where(ok, d, 0)).astype(np.float64)
            q = _codes(wb, d, m, qmax)
            e = _error(wb, wt, d, m, q)
            better = ok & (e < best_e)
            best_e = np.where(better, e, best_e)
            best_d, best_m = np.where(better, d, best_d), np.where(better, m, best_m)
            best_q = np.where(better[..., None], q, best_q)
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
