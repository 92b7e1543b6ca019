"""GPTQ (Frantar et al. 2022): error-compensating rounding into MatMulNBits blocks.

Round-to-nearest rounds every weight on its own. GPTQ rounds the columns of W [N, K] one at a
time and moves each column's rounding error onto the columns not yet rounded, in the proportions
that minimize the layer's output error sum_t ||x_t (W - W')^T||^2 on calibration inputs: with
H = X^T X (dampened by 1% of its mean diagonal) and U the upper Cholesky factor of H^-1, the
error e = (w_j - w'_j) / U_jj of column j updates the columns after it by -e U_j,j+1:. Rows are
independent given H, so the linears that read one input (q/k/v, gate/up) are quantized together.
Updates are applied lazily in batches of 128 columns (one matrix product per batch).

A block's scale and zero point are fixed from the current, error-updated weights of its
group_size columns when the column loop reaches the block, with the same rules as the
round-to-nearest packer (converters/quantize.py): integer zero points over the range widened to
include 0, symmetric, or (float zero points) an fp16 minimum and scale spanning the block. The
act-order option (columns by decreasing H_jj) is off by default: MatMulNBits has no g_idx to
undo the permutation, so its groups are fixed from the unrounded weights before the loop.

Layers are calibrated in order, each on the inputs that the already-quantized layers before it
produce (captured once per layer, one layer's activations in memory). `--method awq+gptq` first
applies AWQ's scaling (and optional clipping) to the layer, then rounds the scaled weights by
GPTQ on the scaled inputs x / s.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .awq import _LayerInputs, awq_layer, fp16_exact, layer_plans, load_layer, new_report, weights_copy
from .calibration import calibration_ids
from .model import ConversionError, SourceModel
from .quantize import QuantizedWeight, _check, dequantize, pack_codes
from .threads import all_cores, physical_cores, torch_threads

LAZY_BATCH = 128
INNER = 32
DAMP = 0.01


def grid(c: torch.Tensor, bits: int, symmetric: bool, float_zero_points: bool):
    """Scale and zero point of blocks c [..., group] by the round-to-nearest packer's rules:
    (scale, zp) with w' = (q - zp) * scale, or with float zero points (scale, minimum), w' = q*scale + minimum."""
    qmax = (1 << bits) - 1
    if float_zero_points:
        minimum = c.amin(-1).half().float()
        return fp16_exact((c.amax(-1) - minimum) / qmax), minimum
    if symmetric:
        mid = 1 << (bits - 1)
        scale = fp16_exact(c.abs().amax(-1) / (mid - 1))
        return scale, torch.full_like(scale, float(mid))
    lo = c.amin(-1).clamp(max=0)
    hi = c.amax(-1).clamp(min=0)
    scale = fp16_exact((hi - lo) / qmax)
    zp = torch.where(scale > 0, torch.round(-lo / scale.clamp(min=1e-30)).clamp(0, qmax), torch.zeros_like(scale))
    return scale, zp


def _round(w, scale, inv, zp, qmax, float_zero_points, q=None, dq=None):
    """Codes and their dequantized values for w on the grid (scale, zp), written into q and dq when
    given (the column loop's rows: a column is a dozen tiny ops, whose per-call cost is most of
    the loop's time, so it builds no temporaries)."""
    if float_zero_points:
        q = torch.sub(w, zp, out=q).mul_(inv).round_().clamp_(0, qmax)
        return q, torch.mul(q, scale, out=dq).add_(zp)
    q = torch.mul(w, inv, out=q).round_().add_(zp).clamp_(0, qmax)
    return q, torch.sub(q, zp, out=dq).mul_(scale)


def _inverse(scale):
    return torch.where(scale > 0, 1.0 / scale.clamp(min=1e-30), torch.zeros_like(scale))


def rtn(w: torch.Tensor, bits: int, group: int, symmetric: bool = False, float_zero_points: bool = False):
    """Round-to-nearest W' [N, K] on the same grids (the baseline GPTQ is measured against)."""
    N, K = w.shape
    blocks = -(-K // group)
    wp = torch.nn.functional.pad(w, (0, blocks * group - K)).reshape(N, blocks, group)
    scale, zp = grid(wp, bits, symmetric, float_zero_points)
    _, dq = _round(wp, scale[..., None], _inverse(scale)[..., None], zp[..., None], (1 << bits) - 1,
                   float_zero_points)
    return dq.reshape(N, -1)[:, :K]


def output_error(dw: torch.Tensor, H: torch.Tensor) -> float:
    """sum_n dw_n H dw_n^T: the output error sum_t ||x_t dw^T||^2 for H = X^T X."""
    return float(((dw @ H.to(dw.dtype)) * dw).sum(dtype=torch.float64))


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, bits: int = 4, group: int = 32, *, symmetric: bool = False,
                  float_zero_points: bool = False, damp: float = DAMP, act_order: bool = False):
    """GPTQ-round W [N, K] for inputs with Gram matrix H = X^T X [K, K].

    Returns (codes uint8 [N, blocks, group], scale [N, blocks], zp [N, blocks], W' [N, K]): W' is the
    dequantized weight, w' = (q - zp)*scale, or q*scale + zp with float zero points (zp the minimum).
    Codes past K hold the block's zero (or 0). Runs on one thread: the column loop is thousands of
    small ops, where more threads mostly wait at barriers (and stall whenever one is descheduled)."""
    _check(bits, group)
    with torch_threads(1):
        return _gptq_columns(w, H, bits, group, symmetric, float_zero_points, damp, act_order)


def gptq_groups(jobs: list[tuple[torch.Tensor, torch.Tensor]], bits: int = 4, group: int = 32, *,
                symmetric: bool = False, float_zero_points: bool = False, damp: float = DAMP,
                act_order: bool = False) -> list:
    """gptq_quantize(w, H, ...) for each (w, H) of jobs, the same results in the same order, with the
    column loops running side by side, one per physical core: each loop is thousands of small
    single-threaded ops, so whole loops spread over the cores where one loop's threads could not.
    The largest weights are started first."""
    _check(bits, group)
    out: list = [None] * len(jobs)

    def run(j: int) -> None:
        w, H = jobs[j]
        out[j] = _gptq_columns(w, H, bits, group, symmetric, float_zero_points, damp, act_order)

    largest_first = sorted(range(len(jobs)), key=lambda j: -jobs[j][0].numel())
    with torch_threads(1), ThreadPoolExecutor(max(1, min(len(jobs), physical_cores()))) as pool:
        list(pool.map(run, largest_first))
    return out


@torch.no_grad()
def _gptq_columns(w, H, bits, group, symmetric, float_zero_points, damp, act_order):
    W = w.detach().float().clone()
    N, K = W.shape
    blocks = -(-K // group)
    qmax = (1 << bits) - 1
    H = H.detach().double().clone()
    diag = torch.diagonal(H)
    dead = diag <= 0
    diag[dead] = 1.0   # an input that is always 0: its column's error goes nowhere
    diag += damp * float(diag.mean())
    perm = torch.argsort(torch.diagonal(H), descending=True) if act_order else None
    scale = torch.zeros(blocks, N)   # transposed while the loop runs, as are the codes: rows are contiguous
    zp = torch.zeros(blocks, N)
    if act_order:   # groups fixed from the unrounded weights (MatMulNBits blocks are contiguous in K)
        scale, zp = grid(torch.nn.functional.pad(W, (0, blocks * group - K)).reshape(N, blocks, group), bits,
                         symmetric, float_zero_points)
        scale, zp = scale.T.contiguous(), zp.T.contiguous()
        W, H = W[:, perm], H[perm][:, perm]
        col_group = perm // group
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    Q = torch.zeros(K, N)
    DQ = torch.zeros(K, N)
    # Columns are rounded in rows of a transposed copy (a column's update is then contiguous), the
    # error of each 32-column step reaches the rest of its 128-column batch, and each batch's the
    # columns after it, by matrix products (the same result as column by column, far fewer passes).
    batch = max(1, LAZY_BATCH // group) * group
    step = min(group, INNER)
    inv = _inverse(scale)
    WT = W.T.contiguous()
    for i1 in range(0, K, batch):
        i2 = min(i1 + batch, K)
        errT = torch.zeros(i2 - i1, N)
        for s1 in range(i1, i2, step):
            s2 = min(s1 + step, i2)
            Wb = WT[s1:s2]            # a view: updates land in WT
            Ub = U[s1:s2, s1:s2]
            for j in range(s2 - s1):
                col = s1 + j
                if act_order:
                    g = int(col_group[col])
                else:
                    g = col // group
                    if col % group == 0:
                        scale[g], zp[g] = grid(WT[col:col + group].T, bits, symmetric, float_zero_points)
                        inv[g] = _inverse(scale[g])
                wj = Wb[j]
                _, dq = _round(wj, scale[g], inv[g], zp[g], qmax, float_zero_points, Q[col], DQ[col])
                e = torch.sub(wj, dq, out=errT[col - i1]).div_(Ub[j, j])
                Wb[j + 1:].addr_(Ub[j, j + 1:], e, alpha=-1.0)
            if s2 < i2:
                WT[s2:i2].addmm_(U[s1:s2, s2:i2].T, errT[s1 - i1:s2 - i1], alpha=-1.0)
        if i2 < K:
            WT[i2:].addmm_(U[i1:i2, i2:].T, errT, alpha=-1.0)
    if act_order:
        back = torch.argsort(perm)
        Q, DQ = Q[back], DQ[back]
    Q, DQ, scale, zp = Q.T, DQ.T.contiguous(), scale.T.contiguous(), zp.T.contiguous()
    pad = blocks * group - K
    codes = torch.cat([Q, (zp if not float_zero_points else torch.zeros_like(zp))[:, -1:].expand(N, pad)], 1) \
        if pad else Q
    return codes.reshape(N, blocks, group).to(torch.uint8), scale, zp, DQ


def pack(codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int, group: int, K: int, *,
         symmetric: bool, float_zero_points: bool) -> QuantizedWeight:
    """gptq_quantize's result in the MatMulNBits layout."""
    q, s, z = codes.numpy(), scale.numpy().astype(np.float32), zp.numpy()
    if float_zero_points:
        return pack_codes(q, s, z, bits, group, K)
    N, blocks, _ = q.shape
    B = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8) if bits == 4 else q
    zero_points = None
    if not symmetric:
        zq = z.astype(np.uint8)
        if bits == 4:
            if blocks % 2:
                zq = np.pad(zq, ((0, 0), (0, 1)))
            zq = zq[:, 0::2] | (zq[:, 1::2] << 4)
        zero_points = np.ascontiguousarray(zq)
    return QuantizedWeight(np.ascontiguousarray(B), s.reshape(-1).copy(), zero_points, K, N, bits, group)


def check_options(bits: int, group_size: int, symmetric: bool, float_zero_points: bool) -> None:
    _check(bits, group_size)
    if float_zero_points and (symmetric or bits != 4):
        raise ConversionError("float zero points are for asymmetric int4 (not --symmetric, not int8)")


def gptq_transform(src: SourceModel, **kw) -> tuple[SourceModel, dict, dict]:
    """(source, linear_override, report): every decoder linear of src rounded by GPTQ (after AWQ's
    scaling with awq=True, which also changes the norms/rows 1/s folds into, hence the new source);
    lm_head keeps the writer's default. Keywords: _gptq's."""
    with all_cores():
        return _gptq(src, **kw)


def _gptq(src: SourceModel, *, bits: int = 4, group_size: int = 32, symmetric: bool = False,
          float_zero_points: bool = False, awq: bool = False, clip: bool = True, damp: float = DAMP,
          act_order: bool = False, calib_ids: np.ndarray | None = None, calib_file=None, calib_tokens: int = 1024,
          progress: bool = True, model=None) -> tuple[SourceModel, dict, dict]:
    from tqdm import tqdm

    from .torch_ref import build_torch_model

    check_options(bits, group_size, symmetric, float_zero_points)
    if not 0 < damp < 1:
        raise ConversionError(f"GPTQ dampening must be in (0, 1), got {damp}")
    cfg = src.config
    if model is None:   # the caller's model is changed: each layer gets its quantized weights
        model = build_torch_model(src, progress=progress)
    if calib_ids is None:
        calib_ids = calibration_ids(src, model, text_file=calib_file, n_tokens=calib_tokens, progress=progress)
    method = "awq+gptq" if awq else "gptq"
    report = {**new_report(method, cfg, calib_ids, calib_file), "damp": damp, "act_order": act_order,
              "lazy_batch": LAZY_BATCH, "output_error_rtn": 0.0, "output_error_gptq": 0.0,
              "zero_points": "float" if float_zero_points else "none" if symmetric else "integer"}
    if not awq:
        del report["not_folded"]
    else:
        report.update(alphas={}, loss_rtn=0.0, loss_awq=0.0, clip=clip)   # AWQ search objective
    override: dict[str, QuantizedWeight] = {}
    folded: dict[str, torch.Tensor] = {}   # what AWQ's 1/s changed besides the linears (norms, biases)
    layers = _LayerInputs(model, calib_ids)
    it = range(cfg.num_layers)
    for i in (tqdm(it, desc=method.upper(), unit="layer") if progress else it):
        p = f"model.layers.{i}."
        t = weights_copy(src, model, p)   # layer i as src has it: the model reloads it only below
        acts = layers.capture(i)
        scales = {}
        if awq:
            scales = awq_layer(t, acts, i, cfg, bits=bits, group_size=group_size, symmetric=symmetric, clip=clip,
                               report=report)
        groups = []
        for group, names, _ in layer_plans(cfg, i, fold_v_o=True):
            x = acts[(i, group)]
            if group in scales:
                x = x / scales[group]
            ws = [t[n] for n in names]
            groups.append((names, ws, torch.cat(ws), (x.T @ x).double(), len(x)))
        rounded = gptq_groups([(w, H) for _, _, w, H, _ in groups], bits, group_size, symmetric=symmetric,
                              float_zero_points=float_zero_points, damp=damp, act_order=act_order)
        for (names, ws, w, H, T), (codes, scale, zp, wq) in zip(groups, rounded):
            # sum over rows of the mean over tokens of (x . dw)^2, for the weights as GPTQ received them
            report["output_error_rtn"] += output_error(rtn(w, bits, group_size, symmetric, float_zero_points) - w,
                                                       H) / T
            report["output_error_gptq"] += output_error(wq - w, H) / T
            row = 0
            for n, wn in zip(names, ws):
                rows = slice(row, row + wn.shape[0])
                override[n] = pack(codes[rows], scale[rows], zp[rows], bits, group_size, w.shape[1],
                                   symmetric=symmetric, float_zero_points=float_zero_points)
                t[n] = wq[rows].clone()
                row += wn.shape[0]
        del acts
        load_layer(model, t, i)   # the next layers calibrate on what this one will deploy
        layers.advance(i)
        if awq:
            folded.update((n, v) for n, v in t.items() if n not in override)
    tensors = dict(src.tensors)
    tensors.update({n: (lambda v=v: v.numpy()) for n, v in folded.items()})
    tensors.update({n: (lambda qw=qw: dequantize(qw)) for n, qw in override.items()})
    new = SourceModel(cfg, tensors, tokenizer_json=src.tokenizer_json, chat_template=src.chat_template,
                      add_bos_token=src.add_bos_token, provenance=dict(src.provenance))
    return new, override, report
