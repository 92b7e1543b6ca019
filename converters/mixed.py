"""Mixed bits per tensor under a size budget (`--target-bpw`, `--max-size`).

Each linear (and lm_head) can be stored in one of a few MatMulNBits formats, from
int4 g128 (4.16 bits per weight in the file) to int8 g32 (8.5); a quantized GGUF source
adds its own blocks (gguf_blocks: exact, no rounding error). A tensor's cost in each
format is its bytes; its error is the activation-weighted squared error of its
outputs on calibration text, sum_n sum_k E[x_k^2] (W'-W)[n,k]^2 (the diagonal of the
input's second moment, what llama.cpp's imatrix weights by): the format that loses
least where the activations are large. A greedy pass over each tensor's lower convex
hull of (bytes, error) then buys the largest error reduction per byte until the
budget is spent, so the sensitive tensors get the bits (which ones, and how many, is
recorded in edgeact.json).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import torch

from .model import ConversionError, SourceModel
from .quantize import QuantizedWeight, dequantize, quantize_blockwise

# label → (bits, block_size, zero points: "int" | "float" | "sym")
FORMATS = {
    "int4-g128": (4, 128, "int"),
    "int4-g64": (4, 64, "int"),
    "int4-g32": (4, 32, "int"),
    "int4-g32-fmin": (4, 32, "float"),
    "int8-g64": (8, 64, "sym"),
    "int8-g32": (8, 32, "sym"),
}
SOURCE_FORMAT = "source"   # the quantized source's own blocks


def quantize_as(w: np.ndarray, label: str) -> QuantizedWeight:
    bits, group, zp = FORMATS[label]
    return quantize_blockwise(w, bits, group, symmetric=zp == "sym", float_zero_points=zp == "float")


def format_bytes(label: str, N: int, K: int) -> int:
    bits, group, zp = FORMATS[label]
    blocks = -(-K // group)
    # our quantizers round scales (and block minimums) to fp16 values, which the writer stores in 2 bytes
    zbytes = 0 if zp == "sym" else N * blocks * 2 if zp == "float" else N * (-(-blocks // 2) if bits == 4 else blocks)
    return N * blocks * group * bits // 8 + N * blocks * 2 + zbytes


def linear_names(src: SourceModel) -> list[str]:
    cfg = src.config
    names = [f"model.layers.{i}.{m}.weight" for i in range(cfg.num_layers)
             for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    return names + ["lm_head.weight"]


def _input_of(name: str) -> str:
    if name == "lm_head.weight":
        return "lm_head"
    layer = name.split(".")[2]
    for key, group in (("q_proj", "attn_in"), ("k_proj", "attn_in"), ("v_proj", "attn_in"), ("o_proj", "attn_out"),
                       ("gate_proj", "ffn_in"), ("up_proj", "ffn_in"), ("down_proj", "ffn_out")):
        if key in name:
            return f"{layer}.{group}"
    raise KeyError(name)


@torch.no_grad()
def input_second_moments(model, ids: np.ndarray) -> dict[str, np.ndarray]:
    """E[x_k^2] of every linear's input on the token ids, as {"<layer>.<group>" | "lm_head": [K]};
    accumulated in the hooks, so memory is one vector per input."""
    sums: dict[str, torch.Tensor] = {}
    count = {"n": 0}
    hooks = []

    def hook_for(key):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[key] = sums.get(key, 0) + (x * x).sum(0)
            if key == "lm_head":
                count["n"] += x.shape[0]
        return hook

    for i, block in enumerate(model.model.layers):
        for group, mod in (("attn_in", "self_attn.q_proj"), ("attn_out", "self_attn.o_proj"),
                           ("ffn_in", "mlp.gate_proj"), ("ffn_out", "mlp.down_proj")):
            hooks.append(block.get_submodule(mod).register_forward_pre_hook(hook_for(f"{i}.{group}")))
    hooks.append(model.lm_head.register_forward_pre_hook(hook_for("lm_head")))
    try:
        for row in np.atleast_2d(ids):
            model(torch.from_numpy(np.asarray(row, dtype=np.int64))[None])
    finally:
        for h in hooks:
            h.remove()
    return {k: (v / max(count["n"], 1)).float().numpy() for k, v in sums.items()}


@dataclass
class Choice:
    name: str
    N: int
    K: int
    options: list[tuple[str, int, float]]   # (format, bytes, error) on the lower convex hull, bytes ascending
    pick: int = 0


def _hull(points: list[tuple[str, int, float]]) -> list[tuple[str, int, float]]:
    """The lower convex hull of (bytes, error), cheapest first: the options a greedy budget can buy in order."""
    pts = sorted(points, key=lambda p: (p[1], p[2]))
    dominated = []
    for p in pts:   # drop options no better than a cheaper one
        if dominated and p[2] >= dominated[-1][2]:
            continue
        dominated.append(p)
    hull: list[tuple[str, int, float]] = []
    for p in dominated:
        while len(hull) >= 2:
            (_, b1, e1), (_, b2, e2) = hull[-2], hull[-1]
            # hull[-1] is above the segment hull[-2] → p: its slope is no better than going straight to p
            if (e1 - e2) * (p[1] - b1) <= (e1 - p[2]) * (b2 - b1):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate(choices: list[Choice], budget: int) -> int:
    """Greedy over the hulls: start at each tensor's cheapest option, then buy the upgrade with the
    largest error drop per byte while it fits. Returns the bytes used."""
    used = sum(c.options[0][1] for c in choices)
    if used > budget:
        raise ConversionError(f"size budget {budget / 1e6:.1f} MB is below the smallest mix "
                              f"({used / 1e6:.1f} MB of linear weights in the cheapest format)")
    heap = []

    def push(i):
        c = choices[i]
        if c.pick + 1 < len(c.options):
            (_, b0, e0), (_, b1, e1) = c.options[c.pick], c.options[c.pick + 1]
            heapq.heappush(heap, (-(e0 - e1) / max(b1 - b0, 1), i))

    for i in range(len(choices)):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        c = choices[i]
        extra = c.options[c.pick + 1][1] - c.options[c.pick][1]
        if used + extra > budget:
            continue   # this upgrade does not fit; a cheaper one elsewhere might
        used += extra
        c.pick += 1
        push(i)
    return used


def mixed_plan(src: SourceModel, *, target_bpw: float | None = None, max_bytes: int | None = None,
               fixed_bytes: int = 0, formats=tuple(FORMATS), calib_ids=None, calib_file=None,
               calib_tokens: int = 512, progress: bool = True, shared_embedding: bool = False) -> tuple[dict, dict]:
    """Per-tensor formats for src's linears and lm_head within the budget: target_bpw (bits per weight
    over those tensors, scales and zero points included) or max_bytes (their bytes plus fixed_bytes,
    what the rest of the folder takes). Returns (linear_override loaders, report for edgeact.json)."""
    from tqdm import tqdm

    from .calibration import calibration_ids
    from .torch_ref import build_torch_model

    if (target_bpw is None) == (max_bytes is None):
        raise ConversionError("give one size budget: target bits per weight or a maximum size")
    model = build_torch_model(src)
    if calib_ids is None:
        calib_ids = calibration_ids(src, model, text_file=calib_file, n_tokens=calib_tokens)
    moments = input_second_moments(model, calib_ids)
    del model
    names = linear_names(src)
    tied = "lm_head.weight" not in src.tensors
    choices = []
    for name in tqdm(names, desc="sensitivity", unit="tensor", disable=not progress):
        key = "model.embed_tokens.weight" if tied and name == "lm_head.weight" else name
        w = src.load(key)
        N, K = w.shape
        imp = moments[_input_of(name)].astype(np.float64)
        points = []   # the source's own blocks first: kept over a format that ties with them
        if key in src.quantized:
            im = src.quantized[key]()
            err = 0.0 if im.exact else float(((dequantize(im.qw) - w) ** 2 @ imp).sum())
            points.append((SOURCE_FORMAT, im.qw.file_nbytes, err))
        for label in formats:
            if shared_embedding and name == "lm_head.weight" and FORMATS[label][2] == "float":
                continue   # the lookup (GatherBlockQuantized) takes integer zero points only
            err = float(((dequantize(quantize_as(w, label)) - w) ** 2 @ imp).sum())
            points.append((label, format_bytes(label, N, K), err))
        choices.append(Choice(name, N, K, _hull(points)))
    n_weights = sum(c.N * c.K for c in choices)
    budget = int(target_bpw * n_weights / 8) if target_bpw is not None else int(max_bytes) - int(fixed_bytes)
    used = allocate(choices, budget)

    override = {}
    for c in choices:
        label = c.options[c.pick][0]
        key = "model.embed_tokens.weight" if tied and c.name == "lm_head.weight" else c.name
        if label == SOURCE_FORMAT:
            override[c.name] = (lambda k=key: src.quantized[k]().qw)
        else:
            override[c.name] = (lambda k=key, lab=label: quantize_as(src.load(k), lab))
    recipe: dict[str, int] = {}
    for c in choices:
        recipe[c.options[c.pick][0]] = recipe.get(c.options[c.pick][0], 0) + 1
    report = {"weights": "mixed", "target_bpw": target_bpw, "max_bytes": max_bytes,
              "bits_per_weight": round(used * 8 / n_weights, 4), "linear_bytes": used,
              "error": "sum over tensors of sum_n,k E[x_k^2] (W'-W)^2 on calibration text",
              "recipe": recipe, "per_tensor": {c.name: c.options[c.pick][0] for c in choices},
              "calibration_tokens": int(np.asarray(calib_ids).size)}
    return override, report


# ---- the `edgeact convert` extension (picked up by sdk/commands/convert.py)

def add_convert_args(parser) -> None:
    g = parser.add_argument_group("mixed bits under a size budget")
    g.add_argument("--target-bpw", type=float, default=None, metavar="BITS",
                   help="average bits per weight of the linear layers and lm_head (scales and zero points "
                   "included); each tensor gets the format that buys the most accuracy per byte")
    g.add_argument("--max-size", type=float, default=None, metavar="MB",
                   help="the whole folder's weights at most this many MB (10^6 bytes)")


def convert_kwargs(args, source, kw):
    target, max_mb = getattr(args, "target_bpw", None), getattr(args, "max_size", None)
    if target is None and max_mb is None:
        return source, kw
    if target is not None and max_mb is not None:
        raise ConversionError("give --target-bpw or --max-size, not both")
    if target is not None and not 4.0 <= target <= 9.0:
        raise ConversionError(f"--target-bpw {target} is outside what the formats span (about 4.3 to 9)")
    from .onnx_writer import _weight_bytes, default_embedding
    from .readers import ensure_source

    src = ensure_source(source, kw)
    fixed = 0
    if max_mb is not None:   # what the rest of the folder takes: embedding table, norms, rope caches
        c = src.config
        emb = kw.get("embedding") or default_embedding("int4", kw.get("lm_head"), c.tie_word_embeddings)
        ctx = kw.get("max_context") or c.max_position_embeddings
        # a shared embedding is lm_head's table, priced with the linears
        fixed = int((0 if emb == "shared" else _weight_bytes(c.vocab_size * c.hidden_size, emb, 32))
                    + 4.0 * (ctx * c.head_dim + c.num_layers * 4 * c.hidden_size + c.hidden_size)
                    + 8192 * (c.num_layers + 1) + 65536)   # the graph itself, alignment padding
    emb = kw.get("embedding") or default_embedding("int4", kw.get("lm_head"), src.config.tie_word_embeddings)
    override, report = mixed_plan(src, target_bpw=target, shared_embedding=emb == "shared", max_bytes=None if max_mb is None else int(max_mb * 1e6),
                                  fixed_bytes=fixed, calib_file=getattr(args, "calib", None),
                                  calib_tokens=min(getattr(args, "calib_tokens", 512) or 512, 1024),
                                  progress=kw.get("progress", True))
    kw["linear_override"] = {**override, **(kw.get("linear_override") or {})}
    if kw.get("quant") in (None, "source"):
        kw["quant"] = "int4"
    kw["mixed"] = report
    kw.setdefault("method", "rtn")
    return src, kw
