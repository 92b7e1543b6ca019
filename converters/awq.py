"""Activation-aware weight quantization (AWQ, Lin et al. 2023) as a weight transform.

Round-to-nearest loses most on the weight columns that meet the largest
activations. AWQ scales those input channels up before quantizing (W·diag(s))
and folds 1/s into whatever produces the input (an RMSNorm weight, or the rows
of the previous linear), so the fp32 function is unchanged and the graph gains
no op. s = s_x^α with s_x the mean |x| per channel on calibration text; α is
searched on a grid for each group of linears sharing an input, minimizing the
group's output error after quantization. An optional clipping search then
shrinks each output row's range where that lowers its output error. Both rank
their candidates on a low-rank-plus-diagonal sketch of the inputs' Gram matrix
(_Sketch), a small fraction of the exact products; α's two best are then scored
exactly.

The result is an ordinary SourceModel: the writer's round-to-nearest packer
quantizes it into the same MatMulNBits format, so every engine runs it unchanged.
"""
from __future__ import annotations

import numpy as np
import torch

from .calibration import INPUT_GROUPS, calibration_ids
from .model import SourceModel
from .quantize import FP16_MAX, FP16_NORMAL_MIN
from .threads import all_cores

ALPHAS = np.linspace(0.0, 1.0, 21)[:-1]      # 0, 0.05, ..., 0.95 (α=0 is plain RTN)
# The grid is searched coarse to fine: every 4th α, then the best one's neighbours 2 and then 1
# step away (9 of the 20 scored). On SmolLM2's 90 groups this picks the full scan's α in 88 and
# adds 0.01% to the summed error; the error over α is close to unimodal at that spacing.
ALPHA_STEPS = (4, 2, 1)
# Candidates are ranked on a rank-32 sketch, the two best scored exactly: on SmolLM2's 90 groups,
# coarse to fine, that finds the full exact scan's α in 84 and adds 0.009% to the summed error.
SKETCH_RANK = 32
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def fp16_exact(scale: torch.Tensor) -> torch.Tensor:
    """quantize.fp16_exact in torch: scales rounded up to fp16 values in fp16's normal range."""
    ok = (scale >= FP16_NORMAL_MIN) & (scale < FP16_MAX)
    h = torch.where(ok, scale, torch.zeros_like(scale)).half()
    h = torch.where(h.float() < scale, (h.view(torch.int16) + 1).view(torch.float16), h)
    return torch.where(ok, h.float(), scale)


def fake_quant(w: torch.Tensor, bits: int, group: int, symmetric: bool) -> torch.Tensor:
    """Quantize-dequantize W [..., N, K] exactly as converters/quantize.py packs each [N, K]
    (leading dimensions are a batch: a search's candidates quantized in one op)."""
    *lead, K = w.shape
    blocks = -(-K // group)
    wp = _padded(w, blocks * group).reshape(*lead, blocks, group)
    qmax = (1 << bits) - 1
    if symmetric:
        mid = 1 << (bits - 1)
        scale = fp16_exact(wp.abs().amax(-1) / (mid - 1))
        zp = torch.full_like(scale, float(mid))
    else:
        lo, hi = torch.aminmax(wp, dim=-1)
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = fp16_exact((hi - lo) / qmax)
        zp = torch.where(scale > 0, torch.round(-lo / scale.clamp(min=1e-30)).clamp(0, qmax), torch.zeros_like(scale))
    inv = torch.where(scale > 0, 1.0 / scale.clamp(min=1e-30), torch.zeros_like(scale))
    # in place on one fresh tensor: the search's cost is these passes over [candidates, N, K].
    # round(x) + zp clamped to [0, qmax], minus zp, is round(x) clamped to [-zp, qmax - zp]
    # (small integers in float32: exact), two passes fewer.
    q = (wp * inv[..., None]).round_().clamp_(-zp[..., None], (qmax - zp)[..., None]).mul_(scale[..., None])
    return q.reshape(*lead, -1)[..., :K]


def _padded(w: torch.Tensor, width: int) -> torch.Tensor:
    """w's last dimension zero-padded to width (w itself when it is that wide: no copy)."""
    return w if w.shape[-1] == width else torch.nn.functional.pad(w, (0, width - w.shape[-1]))


class _Inputs:
    """A linear input x [T, K] for output-error sums: with more tokens than channels the error
    sum_t (x_t dW^T)^2 is read off the Gram matrix x^T x (the same objective, K/T of the work)."""

    def __init__(self, x: torch.Tensor):
        self.x, self.T = x, x.shape[0]
        self.gram = x.T @ x if x.shape[0] > x.shape[1] else None

    def row_errors(self, dw: torch.Tensor) -> torch.Tensor:
        """Per output row n of dw [..., N, K], the mean over tokens of (x_t . dw_n)^2."""
        if self.gram is None:
            # x @ dw^T in this orientation: per candidate the very product (and sums) of the unbatched search
            return torch.matmul(self.x, dw.mT).square_().mean(-2)
        return (torch.matmul(dw, self.gram).mul_(dw)).sum(-1) / self.T


class _Sketch:
    """x's Gram matrix as its top `rank` directions plus the diagonal of the rest,
    G = xᵀx ≈ (VS)(VS)ᵀ + diag(d), for ranking candidates: an error costs N·K·rank instead of
    N·K·min(T, K). Layer inputs put most of G's weight in a few directions (outlier channels),
    and quantization noise is near white in the rest, where the diagonal carries it. The
    directions come from a seeded randomized range finder (power iterations, then Rayleigh-Ritz),
    so a conversion is reproducible."""

    def __init__(self, x: torch.Tensor, rank: int, iters: int = 2):
        self.T, K = x.shape
        y = torch.randn(K, min(rank, K), generator=torch.Generator().manual_seed(0))
        for _ in range(iters + 1):
            y = x.T @ (x @ torch.linalg.qr(y).Q)
        q = torch.linalg.qr(y).Q
        xq = x @ q
        lam, e = torch.linalg.eigh(xq.T @ xq)
        self.vs = (q @ e) * lam.clamp(min=0).sqrt()
        self.d = (x.square().sum(0) - self.vs.square().sum(1)).clamp(min=0)

    def row_errors(self, dw: torch.Tensor) -> torch.Tensor:
        """_Inputs.row_errors, estimated."""
        return (torch.matmul(dw, self.vs).square_().sum(-1) + torch.matmul(dw.square(), self.d)) / self.T


# Candidates quantized at once: about 8 MB of float32 per chunk, so the passes of fake_quant and
# the error product over it stay in the last-level cache (a 128 MB chunk made SmolLM2's searches
# a fifth slower). A chunk holds at least one candidate: a 1B model's widest group is 128 MB.
_BATCH_ELEMENTS = 1 << 21


def _chunks(n: int, per: int):
    step = max(1, _BATCH_ELEMENTS // max(1, per))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def search_scale(x: torch.Tensor, ws: list[torch.Tensor], bits: int, group: int, symmetric: bool,
                 steps: tuple[int, ...] = ALPHA_STEPS, rank: int | None = SKETCH_RANK):
    """Best s = s_x^α over the α grid for linears `ws` that all read input x [T, K], searched at the
    grid spacings `steps` ((1,): every α). The linears are stacked and each level's candidates
    batched: one quantization and one error product per chunk of α for the whole group.
    With a `rank`, the grid is ranked on a _Sketch of x's Gram matrix and the two best are
    scored exactly (None: every candidate exactly).
    Returns (s, α, error at α=0 i.e. RTN, error at the best α)."""
    s_x = x.abs().mean(0).clamp(min=1e-8)
    exact = _Inputs(x)
    w, sizes = torch.cat(ws), [v.shape[0] for v in ws]

    def candidates(idx: list[int]) -> torch.Tensor:
        ss = torch.stack([s_x.pow(float(ALPHAS[i])) for i in idx])
        return ss / (ss.amax(1, keepdim=True) * ss.amin(1, keepdim=True)).sqrt()

    def total(rows: torch.Tensor) -> float:   # the group's error: each linear's mean over its rows, summed
        return float(sum(r.mean() for r in rows.split(sizes)))

    def ranked(errs: dict[int, float]) -> list[int]:   # ties: the lower α first, as a scan keeping strict improvements
        return sorted(errs, key=lambda i: (errs[i], i))

    errs: dict[int, float] = {}
    kept: dict[int, torch.Tensor] = {}   # with a sketch: dW at α=0 and at its two best, to score exactly

    def score(idx: list[int], inputs) -> None:
        for c in _chunks(len(idx), w.numel()):
            s = candidates(idx[c])[:, None, :]
            dw = fake_quant(w * s, bits, group, symmetric).div_(s).sub_(w)
            errs.update((i, total(rows)) for i, rows in zip(idx[c], inputs.row_errors(dw)))
            if inputs is not exact:
                kept.update(zip(idx[c], dw))
                for i in set(kept) - {0, *ranked(errs)[:2]}:
                    del kept[i]
            del dw

    inputs = exact if rank is None else _Sketch(x, rank)
    score(list(range(0, len(ALPHAS), steps[0])), inputs)
    for step in steps[1:]:
        b = ranked(errs)[0]
        score([i for i in (b - step, b + step) if 0 <= i < len(ALPHAS) and i not in errs], inputs)
    if rank is None:
        b = ranked(errs)[0]
    else:
        top = ranked(errs)[:2]
        errs = {i: total(exact.row_errors(dw[None])[0]) for i, dw in kept.items()}
        b = min(top, key=lambda i: (errs[i], i))
    return candidates([b])[0], float(ALPHAS[b]), errs[0], errs[b]


def search_clip(x: torch.Tensor, w: torch.Tensor, bits: int, group: int, symmetric: bool,
                rank: int | None = SKETCH_RANK) -> torch.Tensor:
    """Per output row, the clipping ratio of the weight range with the lowest output error
    (all ratios quantized and scored in one batched op per chunk), estimated on a _Sketch of
    x's Gram matrix with a `rank` (None: exact)."""
    inputs = _Inputs(x) if rank is None else _Sketch(x, rank)
    N, K = w.shape
    blocks = -(-K // group)
    wp = _padded(w, blocks * group).reshape(N, blocks, group)
    lo0, hi0 = torch.aminmax(wp, dim=-1, keepdim=True)
    ratios = torch.tensor(CLIP_RATIOS, dtype=w.dtype)
    best_err = torch.full((N,), float("inf"))
    best_w = w.clone()
    for c in _chunks(len(CLIP_RATIOS), w.numel()):
        r = ratios[c, None, None, None]
        wc = torch.maximum(torch.minimum(wp, hi0 * r), lo0 * r).reshape(-1, N, blocks * group)[..., :K]
        err, idx = inputs.row_errors(fake_quant(wc, bits, group, symmetric).sub_(w)).min(0)   # first of equal minima
        better = err < best_err   # strict, across chunks too: ratios earlier in the list (1.0: no clip) win ties
        best_err = torch.where(better, err, best_err)
        best_w[better] = wc.gather(0, idx[None, :, None].expand(1, N, K))[0][better]
    return best_w


class _Stop(Exception):
    pass


class _LayerInputs:
    """The decoder layers' inputs on the calibration ids, carried forward one layer at a time: each
    layer runs once per sequence (capturing its linears' inputs), not the whole model once per layer.
    What a layer sees is what a full forward pass would give it with the layers before it as they
    were when the states passed them, so with the model unchanged the results equal capture_inputs';
    memory is one layer's activations."""

    def __init__(self, model, ids: np.ndarray):
        self.model, self.states = model, []

        def grab(module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            self.states.append([hidden, tuple(args[1:]), kwargs])
            raise _Stop

        hook = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                for row in np.atleast_2d(ids):
                    try:
                        model(torch.from_numpy(np.asarray(row, dtype=np.int64))[None], use_cache=False)
                    except _Stop:
                        pass
        finally:
            hook.remove()

    @torch.no_grad()
    def capture(self, i: int, advance: bool = False) -> dict[tuple[int, str], torch.Tensor]:
        """Layer i's linear inputs; with `advance`, the same pass also carries the states past it."""
        block = self.model.model.layers[i]
        out: dict[tuple[int, str], list[torch.Tensor]] = {}
        hooks = []
        for g, mods in INPUT_GROUPS.items():
            def hook(m, args, g=g):
                out.setdefault((i, g), []).append(args[0].reshape(-1, args[0].shape[-1]).detach().float().clone())
            hooks.append(block.get_submodule(mods[0]).register_forward_pre_hook(hook))
        try:
            self._run(block, advance)
        finally:
            for h in hooks:
                h.remove()
        return {k: torch.cat(v) for k, v in out.items()}

    @torch.no_grad()
    def advance(self, i: int) -> None:
        self._run(self.model.model.layers[i], True)

    def _run(self, block, advance: bool) -> None:
        for st in self.states:
            y = block(st[0], *st[1], **st[2])
            if advance:
                st[0] = y[0] if isinstance(y, tuple) else y


def awq_transform(src: SourceModel, **kw) -> tuple[SourceModel, dict]:
    """AWQ-scaled (and clipped) fp32 weights of `src`, with a report for edgeact.json (keywords: _awq's)."""
    with all_cores():
        return _awq(src, **kw)


def layer_plans(cfg, i: int, fold_v_o: bool) -> list[tuple[str, list[str], tuple[str, str]]]:
    """Layer i's linear groups as (input group, weight names, (fold kind, where 1/s goes))."""
    p = f"model.layers.{i}."
    ffn_norm = "pre_feedforward_layernorm" if cfg.sandwich_norms else "post_attention_layernorm"   # Gemma
    plans = [("attn_in", [p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight"],
              ("norm", p + "input_layernorm.weight")),
             ("ffn_in", [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
              ("norm", f"{p}{ffn_norm}.weight")),
             ("ffn_out", [p + "mlp.down_proj.weight"], ("rows", p + "mlp.up_proj.weight"))]
    if fold_v_o:
        plans.append(("attn_out", [p + "self_attn.o_proj.weight"], ("rows", p + "self_attn.v_proj.weight")))
    return plans


def new_report(method: str, cfg, calib_ids, calib_file) -> dict:
    fold_v_o = cfg.num_heads == cfg.num_kv_heads
    return {"method": method,
            "calibration": {"tokens": int(np.asarray(calib_ids).size),
                            "source": str(calib_file) if calib_file else "sampled from the fp32 model"},
            "not_folded": [] if fold_v_o else
            [f"model.layers.*.self_attn.o_proj (GQA: {cfg.num_heads} heads share {cfg.num_kv_heads} v heads)"]}


def awq_layer(t: dict, acts: dict, i: int, cfg, *, bits: int, group_size: int, symmetric: bool, clip: bool,
              report: dict) -> dict[str, torch.Tensor]:
    """AWQ on layer i of the tensors t (in place): scales searched on the captured inputs acts, folded;
    returns each scaled group's s (its linears now read x / s)."""
    scales = {}
    for group, names, (kind, prev) in layer_plans(cfg, i, cfg.num_heads == cfg.num_kv_heads):
        # Captured from the fp32 function, which every fold preserves (down's input is SiLU(gate)·up,
        # unchanged by gate/up's input scaling; dividing up's rows by s scales it by exactly 1/s).
        x = acts[(i, group)]
        ws = [t[n] for n in names]
        s, alpha, err0, err1 = search_scale(x, ws, bits, group_size, symmetric)
        report["alphas"][f"{i}.{group}"] = alpha
        report["loss_rtn"] += err0
        report["loss_awq"] += err1
        scales[group] = s
        for n in names:
            t[n] = t[n] * s
        if kind == "norm":   # the norm scales by (norm_offset + w): Gemma keeps w = scale - 1
            t[prev] = (t[prev] + cfg.norm_offset) / s - cfg.norm_offset
        else:
            t[prev] = t[prev] / s[:, None]
            bias = prev.replace(".weight", ".bias")
            if bias in t:
                t[bias] = t[bias] / s
        if clip:   # rows are clipped independently: the group's linears are searched stacked
            clipped = search_clip(x / s, torch.cat([t[n] for n in names]), bits, group_size, symmetric)
            for n, part in zip(names, clipped.split([t[n].shape[0] for n in names])):
                t[n] = part.clone()
    return scales


def load_layer(model, t: dict, i: int) -> None:
    """Copy layer i's tensors of t into the torch model."""
    p = f"model.layers.{i}."
    block = model.model.layers[i]
    with torch.no_grad():
        for n, tensor in t.items():
            if n.startswith(p):
                block.get_parameter(n[len(p):]).copy_(tensor)


def _awq(src: SourceModel, *, bits: int = 4, group_size: int = 128, symmetric: bool = False,
         calib_ids: np.ndarray | None = None, calib_file=None, calib_tokens: int = 1024, clip: bool = True,
         progress: bool = True, model=None) -> tuple[SourceModel, dict]:
    from tqdm import tqdm

    from .torch_ref import build_torch_model

    cfg = src.config
    if model is None:   # the caller's, when it built one from src (AWQ leaves it unchanged)
        model = build_torch_model(src, progress=progress)
    if calib_ids is None:
        calib_ids = calibration_ids(src, model, text_file=calib_file, n_tokens=calib_tokens, progress=progress)
    t = weights_copy(src, model)   # transformed in place
    report = {**new_report("awq", cfg, calib_ids, calib_file), "alphas": {}, "loss_rtn": 0.0, "loss_awq": 0.0,
              "clip": clip}
    layers = _LayerInputs(model, calib_ids)
    it = range(cfg.num_layers)
    for i in (tqdm(it, desc="AWQ", unit="layer") if progress else it):
        # Every layer calibrates on the fp32 model's activations, as in the paper's code: the
        # pass that captures layer i's inputs also carries the states to layer i+1 (folding keeps
        # the function; clipping, which changes it, is searched on the captured inputs).
        acts = layers.capture(i, advance=True)
        awq_layer(t, acts, i, cfg, bits=bits, group_size=group_size, symmetric=symmetric, clip=clip, report=report)
        del acts
    return source_with(src, t), report


def weights_copy(src: SourceModel, model, prefix: str = "") -> dict[str, torch.Tensor]:
    """One float32 copy of src's tensors (those whose names start with `prefix`): the torch model's
    parameters copied where it holds them under the same name (it loaded them from src, unchanged),
    so a quantized source is not dequantized a second time; the rest (Phi-3's fused parts) read
    from src."""
    params = {n: p for n, p in model.named_parameters() if p.dtype == torch.float32}
    return {n: params[n].detach().clone() if n in params else torch.from_numpy(src.load(n))
            for n in src.tensors if n.startswith(prefix)}


def source_with(src: SourceModel, t: dict) -> SourceModel:
    """src with its tensors replaced by t's (torch tensors)."""
    out = {k: (lambda v=v: v.numpy()) for k, v in t.items()}
    return SourceModel(src.config, out, tokenizer_json=src.tokenizer_json, chat_template=src.chat_template,
                       add_bos_token=src.add_bos_token, provenance=dict(src.provenance))
