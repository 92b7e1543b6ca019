"""AWQ's batched searches (every α, every clip ratio quantized in one op) compute what a plain
scan over the grid computes: the same errors, α, scales, clipped weights and codes. The default
searches rank candidates on a sketch of the Gram matrix: its errors are checked against the exact
ones, and what it picks against what the exact scan picks."""
import numpy as np
import pytest
import torch

from edgeact.converters import awq
from edgeact.converters.awq import ALPHAS, CLIP_RATIOS, fake_quant, search_clip, search_scale
from edgeact.converters.quantize import quantize_blockwise


def _row_errors(x, dw):
    gram = x.T @ x if x.shape[0] > x.shape[1] else None
    if gram is None:
        return ((x @ dw.T) ** 2).mean(0)
    return ((dw @ gram) * dw).sum(1) / x.shape[0]


def _scan(x, ws, bits, group, symmetric, grid):
    """One α at a time over the grid indices given, in order, keeping strict improvements."""
    s_x = x.abs().mean(0).clamp(min=1e-8)
    w, sizes = torch.cat(ws), [v.shape[0] for v in ws]
    best, errs = (float("inf"), None, None, None), {}
    for i in grid:
        s = s_x.pow(float(ALPHAS[i]))
        s = s / (s.max() * s.min()).sqrt()
        rows = _row_errors(x, fake_quant(w * s, bits, group, symmetric) / s - w)
        errs[i] = float(sum(r.mean() for r in rows.split(sizes)))
        if errs[i] < best[0]:
            best = (errs[i], float(ALPHAS[i]), s, i)
    return best, errs


def scan_scale(x, ws, bits, group, symmetric):
    """The reference: every α, one at a time."""
    (err, alpha, s, _), errs = _scan(x, ws, bits, group, symmetric, range(len(ALPHAS)))
    return s, alpha, errs[0], err


def scan_coarse_to_fine(x, ws, bits, group, symmetric):
    """The reference of the default search: every 4th α, then the best's neighbours 2 and 1 away,
    each level a plain scan; the first of equal minima wins."""
    (_, _, _, b), errs = _scan(x, ws, bits, group, symmetric, range(0, len(ALPHAS), 4))
    for step in (2, 1):
        near = [i for i in (b - step, b + step) if 0 <= i < len(ALPHAS) and i not in errs]
        errs.update(_scan(x, ws, bits, group, symmetric, near)[1])
        b = min(errs, key=lambda i: (errs[i], i))
    s = x.abs().mean(0).clamp(min=1e-8).pow(float(ALPHAS[b]))
    return s / (s.max() * s.min()).sqrt(), float(ALPHAS[b]), errs[0], errs[b], len(errs)


def scan_clip(x, w, bits, group, symmetric):
    """The reference: one clip ratio at a time, per row keeping strict improvements."""
    best_err, best_w = torch.full((w.shape[0],), float("inf")), w.clone()
    N, K = w.shape
    blocks = -(-K // group)
    wp = torch.nn.functional.pad(w, (0, blocks * group - K)).reshape(N, blocks, group)
    hi0, lo0 = wp.amax(-1, keepdim=True), wp.amin(-1, keepdim=True)
    for r in CLIP_RATIOS:
        wc = torch.maximum(torch.minimum(wp, hi0 * r), lo0 * r).reshape(N, -1)[:, :K]
        err = _row_errors(x, fake_quant(wc, bits, group, symmetric) - w)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_w[better] = wc[better]
    return best_w


def _layer(T, K, sizes, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g)
    x[:, torch.randperm(K, generator=g)[:K // 32]] *= 20.0   # a few large channels, as in real layers
    return x, [torch.randn(n, K, generator=g) * 0.05 for n in sizes]


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("T, K, sizes, group, chunk", [
    (400, 96, [64, 32, 32], 32, None),    # more tokens than channels: errors from the Gram matrix
    (64, 200, [48], 32, None),            # fewer: from x directly; K not a multiple of the group
    (300, 128, [40, 40], 32, 3 * 80 * 128),   # the grid split into chunks of 3 candidates
])
def test_batched_search_equals_the_scan(T, K, sizes, group, chunk, symmetric, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(awq, "_BATCH_ELEMENTS", chunk)
    x, ws = _layer(T, K, sizes, seed=T + K)
    s, alpha, err0, err1 = search_scale(x, ws, 4, group, symmetric, steps=(1,), rank=None)
    s_ref, alpha_ref, err0_ref, err1_ref = scan_scale(x, ws, 4, group, symmetric)
    assert alpha == alpha_ref and alpha > 0
    assert torch.equal(s, s_ref)
    assert err0 == err0_ref and err1 == err1_ref   # the same products and sums, batched
    assert err1 < err0

    s2, alpha2, err0_2, err1_2 = search_scale(x, ws, 4, group, symmetric, rank=None)   # coarse to fine
    s2_ref, alpha2_ref, err0_2ref, err1_2ref, scored = scan_coarse_to_fine(x, ws, 4, group, symmetric)
    assert scored <= 9
    assert alpha2 == alpha2_ref and torch.equal(s2, s2_ref)
    assert err0_2 == err0 and err1_2 == err1_2ref and err1 <= err1_2 < err0

    w = torch.cat(ws) * s
    clipped = search_clip(x / s, w, 4, group, symmetric, rank=None)
    ref = scan_clip(x / s, w, 4, group, symmetric)
    assert torch.equal(clipped, ref)
    assert not torch.equal(clipped, w), "some rows must be clipped for the comparison to mean anything"
    a = quantize_blockwise(clipped.numpy(), 4, group, symmetric)
    b = quantize_blockwise(ref.numpy(), 4, group, symmetric)
    assert np.array_equal(a.B, b.B) and np.array_equal(a.scales, b.scales)
    assert (a.zero_points is None) == symmetric
    assert symmetric or np.array_equal(a.zero_points, b.zero_points)


def _out_err(x, w, wq):
    return float(((x @ (wq - w).T) ** 2).mean(0).sum())


@pytest.mark.parametrize("T, K", [(1024, 192), (256, 320)])
def test_sketch_estimates_the_output_error(T, K):
    """The sketch's error of quantization noise is close to the exact one on inputs with a few large
    channels, and equal (to rounding) when its rank covers every channel."""
    x, (w,) = _layer(T, K, [96], seed=K)
    dw = fake_quant(w * 1.3, 4, 32, False) / 1.3 - w
    exact = awq._Inputs(x).row_errors(dw)
    full = awq._Sketch(x, K).row_errors(dw)
    assert torch.allclose(full, exact, rtol=1e-3, atol=0)
    est = awq._Sketch(x, awq.SKETCH_RANK).row_errors(dw)
    assert abs(float(est.sum() / exact.sum()) - 1) < 0.02
    assert float((est / exact - 1).abs().max()) < 0.1
    flat = awq._Sketch(torch.ones(8, 1) * x[:8, :1], 4)   # rank above the data's: no NaN, the exact error
    assert torch.allclose(flat.row_errors(dw[:, :1]), awq._Inputs(x[:8, :1]).row_errors(dw[:, :1]), rtol=1e-4)


@pytest.mark.parametrize("symmetric", [False, True])
def test_sketched_searches_pick_as_the_exact_scan(symmetric):
    """The default α search ranks on the sketch and scores its two best exactly: its α's exact error
    is the exact scan's best (or within 0.5% of it), and the RTN error it reports is the exact one.
    The sketched clip's rows lose at most 1% of the exact clip's output error."""
    x, ws = _layer(1024, 256, [128, 64], seed=3)
    s, alpha, err0, err1 = search_scale(x, ws, 4, 32, symmetric)
    _, alpha_ref, err0_ref, err1_ref = scan_scale(x, ws, 4, 32, symmetric)
    assert err0 == err0_ref
    assert err1_ref <= err1 <= err1_ref * 1.005 and err1 < err0
    w = torch.cat(ws) * s
    exact, sketched = search_clip(x / s, w, 4, 32, symmetric, rank=None), search_clip(x / s, w, 4, 32, symmetric)
    assert not torch.equal(sketched, w)
    e_exact = _out_err(x / s, w, fake_quant(exact, 4, 32, symmetric))
    e_sketch = _out_err(x / s, w, fake_quant(sketched, 4, 32, symmetric))
    assert e_exact <= e_sketch * (1 + 1e-6) and e_sketch <= e_exact * 1.01


def test_threads_are_the_physical_cores_we_may_use():
    import os

    from edgeact.converters import threads

    n = threads.physical_cores()
    assert 1 <= n <= len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    with threads.all_cores():
        assert torch.get_num_threads() == n
    assert torch.get_num_threads() == before
