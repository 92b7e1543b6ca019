"""CoreInfer-style FFN sparsity: the neurons a prompt uses most are the only ones decode computes.

After the prompt is run (with every neuron on), each FFN layer has, per neuron j of the
intermediate h = SiLU(gate)·up, a score: the number of prompt tokens for which |h_j| is among
that token's `token_k` largest (the paper's token-wise core neurons). The `keep` best-scored
neurons per layer (sentence-wise core neurons, ties to the lower index) form a 0/1 mask that
stays fixed for the rest of the generation; a new prompt (after reset) chooses a new set.

Graph (per layer i, docs/sparsity.md): `ai.edgeact.NeuronMask(h, ffn_mask.{i}, coreinfer.token_k)
→ (h·mask, ffn_score.{i})` before down_proj. `ffn_mask.{i}` is an all-ones initializer that is also a
graph input, so engines override it; `ffn_score.{i}` is a graph output. The function body is the
same rule in standard ops, so onnxruntime runs the file with the same masks as the reference.
The choice of masks lives in the engines (sdk/engines/base.py: choose_core_neurons), so every
caller of an engine gets it.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .model import ConversionError, SourceModel

TOKEN_FRACTION = 0.05   # the paper's α: share of a token's neurons that count as its core


def plan(src: SourceModel, keep_fraction: float) -> dict:
    """The `sparsity` argument of write_onnx for CoreInfer keeping `keep_fraction` of each FFN."""
    cfg = src.config
    if not all(src.has(f"model.layers.{i}.mlp.gate_proj.weight") for i in range(cfg.num_layers)):
        raise ConversionError("coreinfer needs a gated FFN (gate_proj), and this model has none")
    inter = cfg.intermediate_size
    keep = max(1, int(round(keep_fraction * inter)))
    # Token-wise fraction α: a small one ranks neurons by how often they are a token's very strongest.
    # SmolLM2, keep 60%, KL of the continuation vs fp32 (torch, 64-token prompt): α 0.05 → 1.53,
    # 0.1 → 1.88, 0.2 → 2.40, 0.4 → 2.44; so α = 0.05.
    token_k = max(1, int(round(TOKEN_FRACTION * inter)))
    meta = {"method": "coreinfer", "targets": {"ffn": round(1.0 - keep_fraction, 6)}, "keep": keep,
            "token_k": token_k, "inputs": "ffn_mask.{i}", "outputs": "ffn_score.{i}"}
    return {"sites": {}, "coreinfer": {"keep": keep, "token_k": token_k}, "meta": meta}


def neuron_mask_function() -> onnx.FunctionProto:
    """(y, score) = (h·mask, Σ over tokens of [|h_j| ≥ the token's k-th largest |h|])."""
    return helper.make_function(
        "ai.edgeact", "NeuronMask", ["h", "mask", "k"], ["y", "score"],
        [helper.make_node("Mul", ["h", "mask"], ["y"]),
         helper.make_node("Abs", ["h"], ["ah"]),
         helper.make_node("TopK", ["ah", "k"], ["top", "top_idx"], axis=-1),
         helper.make_node("Constant", [], ["last"], value_ints=[-1]),
         helper.make_node("ReduceMin", ["top", "last"], ["kth"], keepdims=1),
         helper.make_node("GreaterOrEqual", ["ah", "kth"], ["core"]),
         helper.make_node("Cast", ["core"], ["coref"], to=onnx.TensorProto.FLOAT),
         helper.make_node("Constant", [], ["tokens"], value_ints=[0, 1]),
         helper.make_node("ReduceSum", ["coref", "tokens"], ["score"], keepdims=0)],
        opset_imports=[helper.make_opsetid("", 23)])

