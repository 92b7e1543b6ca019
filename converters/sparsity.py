"""Activation sparsity: which input channels of a linear are zeroed, and the thresholds
that make a target fraction of them zero on calibration text.

A channel is *active* when its score reaches the threshold; inactive channels are
zero and the weight rows they would meet are never read. Methods (seed papers):

  teal       |x_i|            ≥ t      one threshold per tensor (TEAL)
  chess      |x_i|            ≥ t_i    one threshold per channel (CHESS): scaled own
                                        quantiles, dominant (massive-activation)
                                        channels never pruned
  wina       |x_i|·‖W[:, i]‖  ≥ t      weight-informed score (WINA); ‖·‖ over every
                                        linear reading x (q, k, v share one score)
  cats       |act(gate)_j|    ≥ t      gated FFN: the intermediate channel j is computed
                                        only when its gate activation is large (CATS);
                                        act is the model's own: SiLU, or GELU-tanh (Gemma),
                                        whose small negative lobe scores by magnitude too
  coreinfer  fixed per prompt           gated FFN: the neurons the prompt used most, chosen
                                        after prefill (converters/coreinfer.py; no thresholds)

Each sparse site becomes one `ai.edgeact.Sparsify(x, threshold, col_scale)` node
before the linears that read x (docs/sparsity.md); its ONNX function body is the
same rule in standard ops, so onnxruntime runs the file as dense math with zeros.
Thresholds come from the fp32 model's activations on calibration text.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper

from .calibration import INPUT_GROUPS, CaptureDone, calibration_ids, capture_inputs, stop_pass
from .model import ConversionError, SourceModel

METHODS = ("teal", "chess", "wina", "cats", "coreinfer")
FFN_ONLY = ("cats", "coreinfer")
# Site → (layer type, the linears that read it).
SITES = {"attn_in": ("attn", INPUT_GROUPS["attn_in"]), "attn_out": ("attn", INPUT_GROUPS["attn_out"]),
         "ffn_in": ("ffn", INPUT_GROUPS["ffn_in"]), "ffn_out": ("ffn", INPUT_GROUPS["ffn_out"])}


def sparsify_function() -> onnx.FunctionProto:
    """y = x where |x|·col_scale ≥ threshold, else 0 (threshold, col_scale broadcast over the last axis)."""
    return helper.make_function(
        "ai.edgeact", "Sparsify", ["x", "threshold", "col_scale"], ["y"],
        [helper.make_node("Abs", ["x"], ["ax"]),
         helper.make_node("Mul", ["ax", "col_scale"], ["score"]),
         helper.make_node("GreaterOrEqual", ["score", "threshold"], ["keep"]),
         helper.make_node("Constant", [], ["zero"], value_float=0.0),
         helper.make_node("Where", ["keep", "x", "zero"], ["y"])],
        opset_imports=[helper.make_opsetid("", 23)])


def parse_targets(spec, method: str) -> dict[str, float]:
    """'0.5' or 'attn=0.4,ffn=0.5' → {'attn': .., 'ffn': ..}; cats and coreinfer cover the FFN only."""
    if method not in METHODS:
        raise ConversionError(f"unknown sparsity method {method!r}; choose one of {', '.join(METHODS)}")
    spec = str(spec).strip()
    out: dict[str, float] = {}
    try:
        if "=" in spec:
            for part in spec.split(","):
                k, v = (s.strip() for s in part.split("="))
                if k not in ("attn", "ffn"):
                    raise ConversionError(f"--sparsity layer type must be attn or ffn, not {k!r}")
                out[k] = float(v)
        else:
            out = {"attn": float(spec), "ffn": float(spec)}
    except ValueError:
        raise ConversionError(f"--sparsity takes a number in [0, 1) or attn=A,ffn=F, not {spec!r}") from None
    for k, v in out.items():
        if not 0.0 <= v < 1.0:
            raise ConversionError(f"sparsity {k}={v} outside [0, 1)")
    if method in FFN_ONLY:
        if "=" in spec and "ffn" not in out:
            raise ConversionError(f"{method} sparsifies the FFN only: give ffn=S (or one number), not {spec!r}")
        out = {"ffn": out.get("ffn", 0.0)}
    return out


def _quantile(a: torch.Tensor, q: float, dim=None) -> torch.Tensor:
    a = a.double()
    if dim is None:
        a = a.reshape(-1)
        if a.numel() > 1 << 24:   # torch.quantile's limit: subsample deterministically
            a = a[torch.randperm(a.numel(), generator=torch.Generator().manual_seed(0))[: 1 << 24]]
        return torch.quantile(a, q)
    return torch.quantile(a, q, dim=dim)


# CHESS exemption: a channel whose mean |x| is this many times the median channel's
# (the massive-activation channels of e.g. SmolLM2) is never pruned; at most 1% of channels.
CHESS_OUTLIER_RATIO = 8.0
CHESS_MAX_EXEMPT = 0.01


def chess_thresholds(x: torch.Tensor, target: float) -> torch.Tensor:
    """Per-channel thresholds t_i = lam * q_i, q_i channel i's own |x| quantile at the target,
    with one factor lam solved so that the share of zeroed entries over all channels on the
    calibration activations `x` ([tokens, K], absolute values) is the target; dominant
    channels get t_i = 0 (always active), which the others make up for through lam."""
    x = x.float()
    K = x.shape[1]
    q = _quantile(x, target, dim=0).float()
    mean = x.mean(0)
    ratio = mean / mean.median().clamp_min(torch.finfo(torch.float32).tiny)
    exempt = ratio >= CHESS_OUTLIER_RATIO
    cap = int(CHESS_MAX_EXEMPT * K)
    if int(exempt.sum()) > cap:
        exempt = torch.zeros(K, dtype=torch.bool)
        exempt[torch.topk(ratio, cap).indices] = True
    q = torch.where(exempt, torch.zeros_like(q), q)

    def share(lam: float) -> float:
        return float((x < lam * q).float().mean())

    lo, hi = 0.0, 1.0
    while share(hi) < target and hi < 1e6:
        hi *= 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if share(mid) < target else (lo, mid)
    return hi * q


# What CATS thresholds, per gate activation (the graph's ffn_act Sparsify reads that node's output).
CATS_SCORE = {"silu": "|SiLU(gate)|", "gelu_tanh": "|GELU-tanh(gate)|"}

# Calibration captures the inputs of several layers per forward pass, up to this many bytes.
CAPTURE_BUDGET = 256 * 1024**2


def calibrate(src: SourceModel, method: str, targets: dict[str, float], *, calib_ids=None, calib_file=None,
              calib_tokens: int = 1024, progress: bool = True, model=None) -> dict:
    """{"sites": {graph site: (threshold [K], col_scale [K])}, "meta": {... for edgeact.json}}.

    `calib_ids` ([n_seq, seq_len] token ids) are sampled from `src` when not given; `model`
    is src's transformers model when the caller already built it."""
    from tqdm import tqdm

    from .torch_ref import build_torch_model

    cfg = src.config
    if method == "coreinfer":   # chosen per prompt at run time: nothing to calibrate
        from .coreinfer import plan

        return plan(src, 1.0 - targets.get("ffn", 0.0))
    if method == "cats" and cfg.hidden_act not in CATS_SCORE:
        raise ConversionError(f"cats is defined on a SiLU or GELU-tanh gate, not {cfg.hidden_act!r}")
    if method == "cats" and not all(src.has(f"model.layers.{i}.mlp.gate_proj.weight") for i in range(cfg.num_layers)):
        raise ConversionError("cats needs a gated FFN (gate_proj), and this model has none")
    if model is None:
        model = build_torch_model(src, progress=progress)
    if calib_ids is None:
        calib_ids = calibration_ids(src, model, text_file=calib_file, n_tokens=calib_tokens, progress=progress)
    n_tok = int(np.asarray(calib_ids).size)
    wanted = [s for s, (kind, _) in SITES.items() if targets.get(kind, 0.0) > 0]
    if method == "cats":
        wanted = ["ffn_act"] if targets.get("ffn", 0.0) > 0 else []
    widths = {"attn_in": cfg.hidden_size, "attn_out": cfg.num_heads * cfg.head_dim, "ffn_in": cfg.hidden_size,
              "ffn_out": cfg.intermediate_size, "ffn_act": cfg.intermediate_size}
    per_layer = 4 * n_tok * sum(widths[s] for s in wanted) or 1
    chunk = max(1, min(cfg.num_layers, CAPTURE_BUDGET // per_layer))
    sites: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    bar = tqdm(total=cfg.num_layers if wanted else 0, desc=f"calibrating {method}", unit="layer",
               disable=not progress)
    for first in range(0, cfg.num_layers if wanted else 0, chunk):
        layers = list(range(first, min(first + chunk, cfg.num_layers)))
        if method == "cats":
            acts = _capture_gate_act(model, calib_ids, layers)
        else:
            acts = capture_inputs(model, calib_ids, layers=layers, groups=wanted)
        for i in layers:
            p = f"layers.{i}"
            if method == "cats":
                a = acts.pop(i)
                thr = float(_quantile(a.abs(), targets["ffn"]))
                K = a.shape[1]
                sites[f"{p}.ffn_act"] = (np.full(K, thr, np.float32), np.ones(K, np.float32))
                bar.update(1)
                continue
            for site in wanted:
                kind, linears = SITES[site]
                x = acts.pop((i, site)).abs()
                K = x.shape[1]
                col = torch.ones(K)
                if method == "wina":
                    sq = sum(torch.from_numpy(src.load(f"model.layers.{i}.{lin}.weight")).pow(2).sum(0)
                             for lin in linears)
                    col = sq.sqrt().float()
                if method == "chess":
                    thr = chess_thresholds(x, targets[kind])
                else:
                    thr = torch.full((K,), float(_quantile(x * col, targets[kind])))
                sites[f"{p}.{site}"] = (thr.numpy().astype(np.float32), col.numpy().astype(np.float32))
            bar.update(1)
        del acts
    bar.close()
    meta = {"method": method, "targets": targets, "sites": len(sites),
            **({"score": CATS_SCORE[cfg.hidden_act]} if method == "cats" else {}),
            "calibration": {"tokens": n_tok,
                            "source": str(calib_file) if calib_file else "sampled from the fp32 model"}}
    return {"sites": sites, "meta": meta}


@torch.no_grad()
def _capture_gate_act(model, ids, layers) -> dict[int, torch.Tensor]:
    """act(gate) of each of `layers` (the module transformers applies: SiLU, or GELU-tanh on Gemma),
    as {layer: [tokens, I]}; each pass stops after the last one."""
    got: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    # Phi-3 names the module activation_fn (applied to the gate half of its fused gate_up_proj)
    acts = {i: getattr(model.model.layers[i].mlp, "act_fn", None) or model.model.layers[i].mlp.activation_fn
            for i in layers}
    hooks = [acts[i].register_forward_hook(
        lambda m, a, out, i=i: got[i].append(out.reshape(-1, out.shape[-1]).float().clone())) for i in layers]
    hooks.append(model.model.layers[max(layers)].register_forward_hook(stop_pass))
    try:
        for row in np.atleast_2d(ids):
            try:
                model(torch.from_numpy(np.asarray(row, dtype=np.int64))[None])
            except CaptureDone:
                pass
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.cat(v) for i, v in got.items()}
