"""Write a SourceModel as the decoder graph of docs/model-folder.md (model.onnx [+ model.onnx.data]).

Weights stream through one at a time: load a source tensor, quantize it,
store the initializer (in memory, or straight into the aligned external data
file), drop the fp32 copy.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .. import contract
from .model import HIDDEN_ACTS, SUPPORTED_ARCHITECTURES, ConversionError, SourceModel
from .quantize import BLOCK_SIZES, QuantizedWeight, half_minimums, holds_in_fp16, quantize_blockwise
from .rope_cache import cos_sin_cache, local_config, rotary_dim

QUANT_KINDS = ("fp32", "fp16", "int8", "int4")
EMBEDDING_KINDS = ("fp32", "fp16", "shared")   # shared: a tied model's one quantized table, read by lm_head too
OPSET = [helper.make_opsetid(domain, v) for domain, v in contract.OPSET.items()]
IR_VERSION = 10
DATA_FILE = "model.onnx.data"
ALIGN = 64
# Above this, weights go to model.onnx.data: protobuf raw_data is unaligned, so the native runtime
# would have to copy every tensor it reads in place (the fp16 embedding, fp32 weights).
_EXTERNAL_MIN = 16 * 1024**2
DEFAULT_MAX_CONTEXT = 8192   # positions the rope caches cover unless --max-context says more
GQA_HEAD_MULTIPLE = 16   # onnxruntime's CPU GroupQueryAttention rejects other head sizes


def graph_head_dim(head_dim: int) -> int:
    """The head size the graph uses: head_dim rounded up to a multiple of 16 (see pad_heads)."""
    return -(-head_dim // GQA_HEAD_MULTIPLE) * GQA_HEAD_MULTIPLE


def pad_heads(w: np.ndarray, n_heads: int, d: int, D: int, axis: int) -> np.ndarray:
    """Spread each head's d entries along `axis` over D slots, keeping rotate_half pairs (j, j + d/2) at (j, j + D/2).

    The extra slots are zero in q, k and v, so attention scores and outputs are unchanged;
    o_proj gets matching zero columns.
    """
    w = np.moveaxis(w, axis, 0)
    heads = w.reshape(n_heads, d, *w.shape[1:])
    out = np.zeros((n_heads, D, *w.shape[1:]), dtype=w.dtype)
    half = d // 2
    out[:, :half] = heads[:, :half]
    out[:, D // 2: D // 2 + half] = heads[:, half:]
    return np.moveaxis(out.reshape(n_heads * D, *w.shape[1:]), 0, axis)


def rotary_row_order(cfg) -> np.ndarray | None:
    """With partial rotary, the order of a q/k head's rows that puts its rotary_dim/2 pairs (j, j + r/2) and its
    pass-through entries into rotate_half pairs (j, j + head_dim/2) of the full head; None when all rotate.

    The cos/sin caches then hold cos=1, sin=0 in the pass-through pairs (rope_cache.cos_sin_cache), and
    q.k is unchanged because q and k are reordered alike.
    """
    d, r = cfg.head_dim, rotary_dim(cfg)
    if r == d:
        return None
    half_pass = (d - r) // 2
    return np.concatenate([np.arange(0, r // 2), np.arange(r, r + half_pass),
                           np.arange(r // 2, r), np.arange(r + half_pass, d)])


def default_lm_head(quant: str) -> str:
    return "int8" if quant in ("int4", "int8") else quant


def default_embedding(quant: str, lm_head: str | None = None, tied: bool = False) -> str:
    """A tied model with a quantized lm_head (and weights below fp32) keeps one table: lm_head's, which the
    lookup reads too (shared). Otherwise the table is stored in float."""
    if tied and quant != "fp32" and (lm_head or default_lm_head(quant)) in ("int4", "int8"):
        return "shared"
    return "fp32" if quant == "fp32" else "fp16"


def steer_function() -> onnx.FunctionProto:
    """ai.edgeact.Steer(h, add, ablate) = h - (h @ ablate^T) @ ablate + add, in standard ops."""
    nodes = [
        helper.make_node("Transpose", ["ablate"], ["ablate_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "ablate_t"], ["coef"]),
        helper.make_node("MatMul", ["coef", "ablate"], ["proj"]),
        helper.make_node("Sub", ["h", "proj"], ["ablated"]),
        helper.make_node("Add", ["ablated", "add"], ["y"]),
    ]
    return helper.make_function("ai.edgeact", "Steer", ["h", "add", "ablate"], ["y"], nodes,
                                [helper.make_opsetid("", 23)])


class _Initializers:
    """Initializer storage: TensorProtos in memory, or raw bytes appended to the data file at 64-byte offsets."""

    def __init__(self, out_dir: Path, external: bool, graph: onnx.GraphProto):
        self.graph = graph   # initializers go straight into the model's graph: no copy of the weights
        self.external = external
        self.nbytes = 0
        self._file = open(out_dir / DATA_FILE, "wb") if external else None
        self._offset = 0

    def add(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array)
        self.nbytes += array.nbytes
        # int64 parameters (CoreInfer's top-k) stay inline: onnxruntime's shape inference reads them
        if not self.external or array.dtype == np.int64:
            self.graph.initializer.add().CopyFrom(numpy_helper.from_array(array, name))
            return name
        pad = -self._offset % ALIGN
        self._file.write(b"\0" * pad)
        self._offset += pad
        t = self.graph.initializer.add(name=name, dims=list(array.shape),
                                       data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", DATA_FILE), ("offset", str(self._offset)), ("length", str(array.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        self._file.write(array.tobytes())
        self._offset += array.nbytes
        return name

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _weight_bytes(numel: int, kind: str, group_size: int) -> float:
    if kind == "fp32":
        return 4.0 * numel
    if kind == "fp16":
        return 2.0 * numel
    bits = 4 if kind == "int4" else 8
    return numel * (bits / 8 + 4.5 / group_size)


def estimate_bytes(src: SourceModel, quant: str, group_size: int, lm_head: str, embedding: str,
                   max_context: int) -> float:
    """Initializer bytes the writer will produce (to decide on external data before writing)."""
    c = src.config
    h, kv = c.hidden_size, c.num_kv_heads * c.head_dim
    per_layer = h * c.num_heads * c.head_dim * 2 + h * kv * 2 + 3 * h * c.intermediate_size
    total = c.num_layers * _weight_bytes(per_layer, quant, group_size)
    total += _weight_bytes(c.vocab_size * h, lm_head, group_size)
    if embedding != "shared":
        total += _weight_bytes(c.vocab_size * h, embedding, group_size)
    total += 4.0 * (max_context * c.head_dim + c.num_layers * 4 * h + h)
    return total


class GraphBuilder:
    """Builds the node list of docs/model-folder.md; one instance per written model.

    Seam for graph rewrites (activation sparsity): every Linear goes through
    `linear(x, weight, name)`. A subclass may override it for chosen weights
    and emit other ops instead, using `self.weight(weight)` (the source fp32
    [N, K] array), `self.quantized(weight)`, `self.init(name, array)` and
    `self.node(...)`; it must return the name of a float32 [..., N] value.
    """

    def __init__(self, src: SourceModel, inits: _Initializers, *, quant: str, group_size: int, symmetric: bool,
                 lm_head: str, embedding: str, accuracy_level: int,
                 linear_override: dict | None, steering: bool = True, on_tensor=None,
                 sparse_sites: dict | None = None, coreinfer: dict | None = None):
        self.src, self.cfg, self.inits = src, src.config, inits
        self.quant, self.group_size, self.symmetric = quant, group_size, symmetric
        self.lm_head_kind, self.embedding_kind = lm_head, embedding
        self.accuracy_level = accuracy_level
        self.linear_override = dict(linear_override or {})
        self.float_minimum_linears = 0   # decoder linears written with float zero points (edgeact.json)
        self.steering = steering
        self.sparse_sites = dict(sparse_sites or {})   # site → (threshold [K], col_scale [K]); see converters/sparsity.py
        self.coreinfer = coreinfer   # {"keep", "token_k"}: NeuronMask before down_proj (converters/coreinfer.py)
        self.head_dim = graph_head_dim(self.cfg.head_dim)
        self.row_order = rotary_row_order(self.cfg)
        self.shared_table = None   # (QuantizedWeight, initializer names) once the shared embedding is written
        self.embedding_default = False   # embedding "shared" by default: a head it cannot share falls back to fp16
        self._head_qw = None   # lm_head's weight, loaded for a lookup that could not share it
        self.nodes: list[onnx.NodeProto] = []
        self._on_tensor = on_tensor or (lambda name: None)

    # --- primitives -------------------------------------------------------------------------------
    def node(self, op: str, inputs: list[str], name: str, outputs: list[str] | None = None,
             domain: str = "", **attrs) -> str:
        outputs = outputs or [name]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs[0]

    def init(self, name: str, array: np.ndarray) -> str:
        return self.inits.add(name, array)

    def half_init(self, name: str, array: np.ndarray) -> tuple[str, bool]:
        """A float32 parameter (block scales) stored as a float16 initializer where fp16 holds every value
        exactly (half the bytes; quantized formats keep fp16 scales, and RTN rounds its scales to fp16), else
        as float32. Returns the initializer's name and whether it is fp16 (float_value casts it)."""
        a = np.ascontiguousarray(array, np.float32)
        exact = holds_in_fp16(a)
        return self.init(name, a.astype(np.float16) if exact else a), exact

    def zero_points(self, weight: str, qw: QuantizedWeight, scales16: str | None) -> str:
        """The zero points' value. Float zero points whose block minimums and scales are fp16 values
        (imported Q4_1 blocks, our float-minimum quantizers) are stored as the negated minimums in fp16
        and computed in the graph as Div(-minimum, scale) (quantize.half_minimums): half the bytes of
        float32 zero points, folded by both engines at load."""
        name = weight + ".zero_points"
        neg = half_minimums(qw) if scales16 is not None else None
        if neg is not None:
            neg_value = self.float_value(self.init(weight + ".neg_minimums", neg), True)
            return self.node("Div", [neg_value, scales16], name + ".div", outputs=[name])
        return self.init(name, qw.zero_points)

    def float_value(self, name: str, half: bool) -> str:
        """The float32 value of initializer `name`: itself, or a Cast of it when it is fp16 (onnxruntime folds
        the Cast at load, the native runtime reads the fp16 data)."""
        if not half:
            return name
        return self.node("Cast", [name], name + ".cast", outputs=[name + ".f32"], to=TensorProto.FLOAT)

    def weight(self, name: str) -> np.ndarray:
        """The source tensor under `name` (lm_head.weight falls back to the embedding when tied), in graph layout:
        q/k rows (and q/k norm weights) in rotary_row_order, heads padded to the graph's head size."""
        if name == "lm_head.weight" and self.cfg.tie_word_embeddings and not self.src.has(name):
            name = "model.embed_tokens.weight"
        if not self.src.has(name):
            raise ConversionError(f"source is missing tensor {name}")
        self._on_tensor(name)
        w = self.src.load(name)
        if ".self_attn." not in name:
            return w
        c, proj = self.cfg, name.split(".")[-2]
        heads = 1 if proj in ("q_norm", "k_norm") else c.num_heads if proj in ("q_proj", "o_proj") else c.num_kv_heads
        if self.row_order is not None and proj in ("q_proj", "k_proj", "q_norm", "k_norm"):
            w = w.reshape(heads, c.head_dim, *w.shape[1:])[:, self.row_order].reshape(w.shape)
        if self.head_dim != c.head_dim:
            w = pad_heads(w, heads, c.head_dim, self.head_dim, axis=1 if proj == "o_proj" else 0)
        return w

    def kind_of(self, weight: str) -> str:
        return self.lm_head_kind if weight == "lm_head.weight" else self.quant

    def quantized(self, weight: str) -> QuantizedWeight:
        if weight in self.linear_override:
            if self.row_order is not None and weight.split(".")[-2] in ("q_proj", "k_proj"):
                raise ConversionError(f"cannot take a pre-quantized {weight}: its rows are reordered for the "
                                      "partial rotary")
            if self.head_dim != self.cfg.head_dim and ".self_attn." in weight:
                raise ConversionError(f"cannot take a pre-quantized {weight}: head_dim {self.cfg.head_dim} "
                                      f"is padded to {self.head_dim} in the graph")
            self._on_tensor(weight)
            qw = self.linear_override[weight]
            return qw() if callable(qw) else qw   # a loader: imported or searched per tensor, one at a time
        bits = 4 if self.kind_of(weight) == "int4" else 8
        return quantize_blockwise(self.weight(weight), bits, self.group_size, self.symmetric)

    # --- the seam ---------------------------------------------------------------------------------
    def linear(self, x: str, weight: str, name: str) -> str:
        """Emit y = x @ W^T for the source weight `weight` ([N, K], HF name); return y's value name."""
        kind = self.kind_of(weight)
        if weight == "lm_head.weight" and self.shared_table is not None:   # the embedding's table, stored once
            qw, names = self.shared_table
            return self.node("MatMulNBits", [x, *names], name, domain="com.microsoft", K=qw.K, N=qw.N,
                             bits=qw.bits, block_size=qw.block_size, accuracy_level=self.accuracy_level)
        if weight in self.linear_override or kind in ("int4", "int8"):
            qw = self._head_qw if weight == "lm_head.weight" and self._head_qw is not None else self.quantized(weight)
            if qw.float_zero_points and weight != "lm_head.weight":
                self.float_minimum_linears += 1
            scales, half = self.half_init(weight + ".scales", qw.scales)
            inputs = [x, self.init(weight + ".B", qw.B), self.float_value(scales, half)]
            if qw.zero_points is not None:
                inputs.append(self.zero_points(weight, qw, inputs[2] if half else None))
            return self.node("MatMulNBits", inputs, name, domain="com.microsoft", K=qw.K, N=qw.N,
                             bits=qw.bits, block_size=qw.block_size, accuracy_level=self.accuracy_level)
        w = self.weight(weight).T
        if kind == "fp16":
            w16 = self.init(weight, w.astype(np.float16))
            return self.node("MatMul", [x, self.node("Cast", [w16], name + ".cast", to=TensorProto.FLOAT)], name)
        return self.node("MatMul", [x, self.init(weight, w)], name)

    # --- blocks -------------------------------------------------------------------------------------
    def sparsify(self, x: str, site: str) -> str:
        """ai.edgeact.Sparsify before the linears reading `x` when activation sparsity covers `site`."""
        if site not in self.sparse_sites:
            return x
        threshold, col_scale = (np.asarray(a, np.float32) for a in self.sparse_sites[site])
        cfg = self.cfg
        kind = site.rsplit(".", 1)[-1]
        width = {"attn_out": cfg.num_heads * cfg.head_dim, "ffn_act": cfg.intermediate_size,
                 "ffn_out": cfg.intermediate_size}.get(kind, cfg.hidden_size)
        if threshold.shape != (width,) or col_scale.shape != (width,):
            raise ConversionError(f"sparsity site {site}: threshold {threshold.shape} and col_scale "
                                  f"{col_scale.shape} must both have the input width {width}")
        if kind == "attn_out" and self.head_dim != cfg.head_dim:
            # the attention output has padded heads (pad_heads): its padded slots are always zero;
            # they get the largest threshold (so they stay inactive, and a uniform threshold stays
            # uniform) and scale 1
            real = pad_heads(np.ones(width, np.float32), cfg.num_heads, cfg.head_dim, self.head_dim, axis=0) > 0
            pad = lambda a, fill: np.where(real, pad_heads(a, cfg.num_heads, cfg.head_dim, self.head_dim, 0),  # noqa: E731
                                           np.float32(fill))
            threshold, col_scale = pad(threshold, threshold.max()), pad(col_scale, 1.0)
        t = self.init(f"{site}.threshold", threshold)
        cs = self.init(f"{site}.col_scale", col_scale)
        return self.node("Sparsify", [x, t, cs], f"{site}.sparsify", domain="ai.edgeact")

    def rms_norm(self, x: str, weight: str, name: str) -> str:
        w = self.weight(weight)
        if self.cfg.norm_offset:   # Gemma's (1 + w)
            w = w + np.float32(self.cfg.norm_offset)
        return self.node("RMSNormalization", [x, self.init(weight, w)], name,
                         axis=-1, epsilon=float(self.cfg.rms_norm_eps))

    def head_norm(self, x: str, weight: str, name: str) -> str:
        """ai.edgeact.HeadRMSNorm of each head of x (q or k) by the norm weight `weight` (converters/graph_ops.py).

        Padded heads: the norm then averages over D slots instead of d, which a weight scaled by sqrt(d/D)
        and an epsilon scaled by d/D undo exactly (the extra slots are zero).
        """
        c = self.cfg
        w = self.weight(weight)
        if c.norm_offset:
            w = w + np.float32(c.norm_offset)
        ratio = c.head_dim / self.head_dim
        if ratio != 1.0:
            w = (w * np.float32(math.sqrt(ratio))).astype(np.float32)
        return self.node("HeadRMSNorm", [x, self.init(weight, w)], name, domain="ai.edgeact",
                         epsilon=float(c.rms_norm_eps * ratio))

    def projection(self, x: str, prefix: str, proj: str, name: str) -> str:
        y = self.linear(x, f"{prefix}.{proj}.weight", name)
        bias = f"{prefix}.{proj}.bias"
        if self.cfg.attention_bias and self.src.has(bias):
            y = self.node("Add", [y, self.init(bias, self.weight(bias))], name + ".bias")
        return y

    def embed(self) -> str:
        if self.embedding_kind == "shared":
            h = self.shared_lookup()
            if h is not None:
                return self.scale_embedding(h)
            self.embedding_kind = "fp16"
        table = self.weight("model.embed_tokens.weight")
        if self.embedding_kind == "fp16":
            t = self.init("model.embed_tokens.weight", table.astype(np.float16))
            h = self.node("Gather", [t, "input_ids"], "embed")
            h = self.node("Cast", [h], "embed.cast", to=TensorProto.FLOAT)
        else:
            h = self.node("Gather", [self.init("model.embed_tokens.weight", table), "input_ids"], "embed")
        return self.scale_embedding(h)

    def shared_lookup(self) -> str:
        """The embedding lookup of a tied model from lm_head's MatMulNBits table (stored once); None when
        that table has float zero points and the shared table was only the default (the caller writes fp16).

        com.microsoft.GatherBlockQuantized takes the table as [N, K/2] (4-bit) or [N, K] (8-bit) and the
        scales as [N, blocks]: Reshape views of lm_head's B [N, blocks, blob] and scales [N*blocks]; the
        zero points already have its shape. Rows padded to the block come back padded: sliced to hidden.
        """
        qw = self.quantized("lm_head.weight")
        if qw.float_zero_points:   # GatherBlockQuantized's zero points are integers, as the data
            if self.embedding_default:
                self._head_qw = qw
                return None
            raise ConversionError("embedding 'shared' needs lm_head blocks with integer zero points or none; "
                                  "this lm_head has float zero points (use --embedding fp16)")
        scales, half = self.half_init("lm_head.weight.scales", qw.scales)
        names = [self.init("lm_head.weight.B", qw.B), self.float_value(scales, half)]
        if qw.zero_points is not None:
            names.append(self.init("lm_head.weight.zero_points", qw.zero_points))
        self.shared_table = (qw, names)
        blocks = qw.B.shape[1]
        shape2 = self.init("embed.table_shape", np.array([qw.N, blocks * qw.B.shape[2]], np.int64))
        shape_s = self.init("embed.scales_shape", np.array([qw.N, blocks], np.int64))
        table = self.node("Reshape", [names[0], shape2], "embed.table")
        # the view of the stored (fp16) scales, then the Cast: the native runtime reshapes initializers only
        gathered = self.float_value(self.node("Reshape", [scales, shape_s], "embed.scales"), half)
        h = self.node("GatherBlockQuantized", [table, "input_ids", gathered, *names[2:]], "embed", domain="com.microsoft",
                      bits=qw.bits, block_size=qw.block_size, gather_axis=0, quantize_axis=1)
        padded = blocks * qw.block_size
        if padded != qw.K:
            h = self.node("Slice", [h, self.init("embed.slice_starts", np.array([0], np.int64)),
                                    self.init("embed.slice_ends", np.array([qw.K], np.int64)),
                                    self.init("embed.slice_axes", np.array([-1], np.int64))], "embed.slice")
        return h

    def scale_embedding(self, h: str) -> str:
        """Gemma multiplies the looked-up rows by sqrt(hidden) (in the model's dtype, float32 here)."""
        m = self.cfg.embedding_multiplier
        if m == 1.0:
            return h
        return self.node("Mul", [h, self.init("model.embed_scale", np.array(m, np.float32))], "embed.scale")

    def attention(self, i: int, q: str, k: str, v: str, hf: str) -> str:
        """GroupQueryAttention of layer i: rotary from the layer's caches, q/k norm, sliding window, soft-cap."""
        c, p = self.cfg, f"layers.{i}"
        sliding = c.is_sliding(i)
        if c.qk_norm:
            q = self.head_norm(q, f"{hf}.self_attn.q_norm.weight", f"{p}.attn.q_norm")
            k = self.head_norm(k, f"{hf}.self_attn.k_norm.weight", f"{p}.attn.k_norm")
        suffix = "_local" if sliding and c.rope_local_theta is not None else ""
        inputs = [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k",
                  "total_sequence_length", "cos_cache" + suffix, "sin_cache" + suffix]
        attrs = dict(num_heads=c.num_heads, kv_num_heads=c.num_kv_heads, do_rotary=1, rotary_interleaved=0,
                     scale=c.attention_scale if c.attention_scale is not None else 1.0 / math.sqrt(c.head_dim))
        if sliding:   # onnxruntime counts the query itself in local_window_size, as transformers does
            attrs["local_window_size"] = int(c.sliding_window)
        if c.attn_logit_softcapping:
            attrs["softcap"] = float(c.attn_logit_softcapping)
        return self.node("GroupQueryAttention", inputs, f"{p}.attn.gqa",
                         outputs=[f"{p}.attn.gqa", f"present.{i}.key", f"present.{i}.value"],
                         domain="com.microsoft", **attrs)

    def layer(self, i: int, h: str) -> str:
        c = self.cfg
        p, hf = f"layers.{i}", f"model.layers.{i}"
        x = self.sparsify(self.rms_norm(h, f"{hf}.input_layernorm.weight", f"{p}.attn_norm"), f"{p}.attn_in")
        q = self.projection(x, f"{hf}.self_attn", "q_proj", f"{p}.attn.q_proj")
        k = self.projection(x, f"{hf}.self_attn", "k_proj", f"{p}.attn.k_proj")
        v = self.projection(x, f"{hf}.self_attn", "v_proj", f"{p}.attn.v_proj")
        a = self.attention(i, q, k, v, hf)
        o = self.linear(self.sparsify(a, f"{p}.attn_out"), f"{hf}.self_attn.o_proj.weight", f"{p}.attn.o_proj")
        if c.sandwich_norms:
            o = self.rms_norm(o, f"{hf}.post_attention_layernorm.weight", f"{p}.attn.post_norm")
        h1 = self.node("Add", [h, o], f"{p}.attn.residual")
        ffn_norm = "pre_feedforward_layernorm" if c.sandwich_norms else "post_attention_layernorm"
        x2 = self.sparsify(self.rms_norm(h1, f"{hf}.{ffn_norm}.weight", f"{p}.ffn_norm"), f"{p}.ffn_in")
        g = self.linear(x2, f"{hf}.mlp.gate_proj.weight", f"{p}.mlp.gate_proj")
        # CATS: up_proj comes after the gate activation's Sparsify, so the native runtime
        # (which runs nodes in file order) knows the dropped channels and skips their up rows
        cats = f"{p}.ffn_act" in self.sparse_sites
        u = None if cats else self.linear(x2, f"{hf}.mlp.up_proj.weight", f"{p}.mlp.up_proj")
        if c.hidden_act == "gelu_tanh":
            gated = self.node("Gelu", [g], f"{p}.mlp.gelu", approximate="tanh")
        else:
            gated = self.node("Mul", [g, self.node("Sigmoid", [g], f"{p}.mlp.sigmoid")], f"{p}.mlp.silu")
        act = self.sparsify(gated, f"{p}.ffn_act")
        if cats:
            u = self.linear(x2, f"{hf}.mlp.up_proj.weight", f"{p}.mlp.up_proj")
        m = self.node("Mul", [act, u], f"{p}.mlp.gate_mul")
        if self.coreinfer:
            m = self.node("NeuronMask", [m, f"ffn_mask.{i}", "coreinfer.token_k"], f"{p}.mlp.neuron_mask",
                          outputs=[f"{p}.mlp.neuron_mask", f"ffn_score.{i}"], domain="ai.edgeact")
        d = self.linear(self.sparsify(m, f"{p}.ffn_out"), f"{hf}.mlp.down_proj.weight", f"{p}.mlp.down_proj")
        if c.sandwich_norms:
            d = self.rms_norm(d, f"{hf}.post_feedforward_layernorm.weight", f"{p}.mlp.post_norm")
        if not self.steering:
            return self.node("Add", [h1, d], f"{p}.mlp.residual", outputs=[f"hidden.{i}"])
        h2 = self.node("Add", [h1, d], f"{p}.mlp.residual")
        return self.node("Steer", [h2, f"steer.{i}.add", f"steer.{i}.ablate"], f"{p}.steer",
                         outputs=[f"hidden.{i}"], domain="ai.edgeact")


def check_family(cfg) -> None:
    """Refuse family settings the graph does not express (one line each), before any file is written."""
    if cfg.hidden_act not in HIDDEN_ACTS:
        raise ConversionError(f"unsupported hidden activation {cfg.hidden_act!r}; supported: {', '.join(HIDDEN_ACTS)}")
    if cfg.layer_types is not None:
        if len(cfg.layer_types) != cfg.num_layers:
            raise ConversionError(f"layer_types has {len(cfg.layer_types)} entries for {cfg.num_layers} layers")
        bad = sorted(set(cfg.layer_types) - {"full_attention", "sliding_attention"})
        if bad:
            raise ConversionError(f"unsupported layer type(s) {', '.join(bad)}; supported: full_attention, "
                                  "sliding_attention")
    if cfg.sliding_window is not None and cfg.sliding_window < 1:
        raise ConversionError(f"sliding_window must be positive, got {cfg.sliding_window}")
    for label, cap in (("attn_logit_softcapping", cfg.attn_logit_softcapping),
                       ("final_logit_softcapping", cfg.final_logit_softcapping)):
        if cap is not None and not cap > 0:
            raise ConversionError(f"{label} must be positive, got {cap}")


def _tensor_names(src: SourceModel, embedding: str) -> list[str]:
    names = list(src.tensors)
    if src.config.tie_word_embeddings and "lm_head.weight" not in src.tensors and embedding != "shared":
        names.append("lm_head.weight")   # the quantized copy is a separate write
    return names


def write_onnx(src: SourceModel, out_dir, *, quant: str = "int4", group_size: int = 32, symmetric: bool = False,
               lm_head: str | None = None, embedding: str | None = None, accuracy_level: int = 4,
               max_context: int | None = None, external_data: bool | None = None, steering: bool = True,
               progress: bool = True, linear_override: dict | None = None,
               method: str = "rtn", sparsity: dict | None = None) -> dict:
    """Write out_dir/model.onnx (+ model.onnx.data); return the facts edgeact.json records.

    embedding: None = default_embedding (a tied model's quantized lm_head table, read by the lookup too; fp16
    when that table has float zero points, which the lookup cannot take).
    external_data: None = when the weights exceed 16 MiB (always above protobuf's 2 GB); True/False force it.
    steering=False leaves the Steer nodes out (hidden.{i} is then the layer's residual output).
    linear_override: weight name → QuantizedWeight, or a zero-argument function returning one (called once,
    when the weight is written). method names the quantizer in edgeact.json ("awq", "gptq", "source").
    sparsity: {"sites": {site: (threshold, col_scale)}, "meta": {...}} from converters/sparsity.py.
    """
    cfg = src.config
    if cfg.arch not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(f"unsupported architecture {cfg.arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    lm_head = lm_head or default_lm_head(quant)
    embedding_default = embedding is None
    embedding = embedding or default_embedding(quant, lm_head, cfg.tie_word_embeddings)
    for label, value, allowed in (("quant", quant, QUANT_KINDS), ("lm_head", lm_head, QUANT_KINDS),
                                  ("embedding", embedding, EMBEDDING_KINDS)):
        if value not in allowed:
            raise ConversionError(f"unknown {label} type {value!r}; choose one of {', '.join(allowed)}")
    if group_size not in BLOCK_SIZES:
        raise ConversionError(f"group size {group_size} not supported; choose one of {', '.join(map(str, BLOCK_SIZES))}")
    if embedding == "shared" and not (cfg.tie_word_embeddings and lm_head in ("int4", "int8")):
        raise ConversionError("embedding 'shared' needs a tied model (tie_word_embeddings) and an int4 or int8 lm_head")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ConversionError(f"accuracy_level must be 0..4, got {accuracy_level}")
    if cfg.num_heads % cfg.num_kv_heads:
        raise ConversionError(f"num_heads {cfg.num_heads} is not a multiple of num_kv_heads {cfg.num_kv_heads}")
    # by default at most DEFAULT_MAX_CONTEXT: the rope caches take 4 * head_dim bytes per position
    # (twice with sliding layers' own), 67 MB of Gemma 3 270M's folder at its 32768 positions; 0 is an error
    max_context = int(min(cfg.max_position_embeddings, DEFAULT_MAX_CONTEXT) if max_context is None else max_context)
    if max_context < 1:
        raise ConversionError(f"max_context must be positive, got {max_context}")
    check_family(cfg)
    head_dim = graph_head_dim(cfg.head_dim)
    caches = {"": cos_sin_cache(cfg, max_context)}   # validates rope_scaling before any file is written
    if cfg.rope_local_theta is not None and any(cfg.is_sliding(i) for i in range(cfg.num_layers)):
        caches["_local"] = cos_sin_cache(local_config(cfg), max_context)
    if head_dim != cfg.head_dim:   # padded slots rotate by angle 0 (they hold zeros anyway)
        pad = ((0, 0), (0, head_dim // 2 - cfg.head_dim // 2))
        caches = {k: (np.pad(c, pad, constant_values=1.0), np.pad(s_, pad)) for k, (c, s_) in caches.items()}

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = estimate_bytes(src, quant, group_size, lm_head, embedding, max_context) > _EXTERNAL_MIN

    from tqdm import tqdm

    names = _tensor_names(src, embedding)
    bar = tqdm(total=len(names), desc="writing", unit="tensor", disable=not progress)
    seen: set[str] = set()

    def on_tensor(name: str) -> None:
        key = name
        if key in seen:   # the tied embedding is read a second time for lm_head
            key = "lm_head.weight"
        seen.add(key)
        bar.set_postfix_str(key, refresh=False)
        bar.update(1)

    model = onnx.ModelProto(ir_version=IR_VERSION, producer_name="edgeact", opset_import=OPSET)
    inits = _Initializers(out_dir, external_data, model.graph)
    try:
        b = GraphBuilder(src, inits, quant=quant, group_size=group_size, symmetric=symmetric, lm_head=lm_head,
                         embedding=embedding, accuracy_level=accuracy_level, linear_override=linear_override,
                         steering=steering, on_tensor=on_tensor,
                         sparse_sites=(sparsity or {}).get("sites"), coreinfer=(sparsity or {}).get("coreinfer"))
        b.embedding_default = embedding_default
        for suffix, (cos, sin) in caches.items():
            b.init("cos_cache" + suffix, cos)
            b.init("sin_cache" + suffix, sin)
        del caches, cos, sin
        steer_inputs = []
        for i in range(cfg.num_layers):
            if steering:
                b.init(f"steer.{i}.add", np.zeros(cfg.hidden_size, np.float32))
                b.init(f"steer.{i}.ablate", np.zeros((1, cfg.hidden_size), np.float32))
                steer_inputs += [helper.make_tensor_value_info(f"steer.{i}.add", TensorProto.FLOAT, [cfg.hidden_size]),
                                 helper.make_tensor_value_info(f"steer.{i}.ablate", TensorProto.FLOAT,
                                                               [f"R{i}", cfg.hidden_size])]
        core = (sparsity or {}).get("coreinfer")
        if core:
            b.init("coreinfer.token_k", np.array([core["token_k"]], np.int64))
            for i in range(cfg.num_layers):
                b.init(f"ffn_mask.{i}", np.ones(cfg.intermediate_size, np.float32))
                steer_inputs.append(helper.make_tensor_value_info(f"ffn_mask.{i}", TensorProto.FLOAT,
                                                                  [cfg.intermediate_size]))
        h = b.embed()
        for i in range(cfg.num_layers):
            h = b.layer(i, h)
        y = b.rms_norm(h, "model.norm.weight", "final_norm")
        b.linear(y, "lm_head.weight", "lm_head")
        if cfg.final_logit_softcapping:
            cap = b.init("final_logit_softcap", np.array(cfg.final_logit_softcapping, np.float32))
            t = b.node("Tanh", [b.node("Div", ["lm_head", cap], "lm_head.softcap.div")], "lm_head.softcap.tanh")
            b.node("Mul", [t, cap], "lm_head.softcap")
        b.nodes[-1].output[0] = "logits"
    finally:
        bar.close()
        inits.close()

    kv_shape = lambda dim: [1, cfg.num_kv_heads, dim, head_dim]  # noqa: E731
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "sequence_length"]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "sequence_length", cfg.vocab_size])]
    for i in range(cfg.num_layers):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", TensorProto.FLOAT,
                                                        kv_shape("past_sequence_length")))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", TensorProto.FLOAT,
                                                         kv_shape("total_sequence_length")))
    model.graph.name = "edgeact_decoder"
    model.graph.node.extend(b.nodes)
    model.graph.input.extend(inputs + steer_inputs)
    if core:
        outputs += [helper.make_tensor_value_info(f"ffn_score.{i}", TensorProto.FLOAT, [cfg.intermediate_size])
                    for i in range(cfg.num_layers)]
    model.graph.output.extend(outputs)
    if steering:
        model.functions.append(steer_function())
    if sparsity and sparsity.get("sites"):
        from .sparsity import sparsify_function

        model.functions.append(sparsify_function())
    if cfg.qk_norm:
        from .graph_ops import head_rms_norm_function

        model.functions.append(head_rms_norm_function())
    if core:
        from .coreinfer import neuron_mask_function

        model.functions.append(neuron_mask_function())
    path = out_dir / "model.onnx"
    onnx.save_model(model, str(path))
    del model   # check from the file so the weights are not held twice
    onnx.checker.check_model(str(path))
    return {
        "max_context": max_context,
        "quantization": {"weights": quant, "group_size": group_size, "symmetric": symmetric,
                         "method": method, "accuracy_level": accuracy_level,
                         "lm_head": lm_head, "embedding": b.embedding_kind,
                         "float_zero_point_linears": b.float_minimum_linears},
        "steering": ({"layers": cfg.num_layers, "inputs": "steer.{i}.add / steer.{i}.ablate"} if steering else None),
        "sparsity": (sparsity or {}).get("meta"),
        "external_data": bool(external_data),
        "kv_cache": {"num_kv_heads": cfg.num_kv_heads, "head_dim": head_dim},
        "weight_bytes": inits.nbytes,
    }


def stored_weights(folder) -> dict[str, QuantizedWeight]:
    """Every MatMulNBits weight of a written folder as numpy reads the file: {weight name: QuantizedWeight},
    with the stored parameters evaluated as the graph computes them (fp16 Casts, Reshape views, the Div of
    fp16 minimums into float zero points)."""
    folder = Path(folder)
    model = onnx.load(str(folder / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t, base_dir=str(folder)) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def value(name: str) -> np.ndarray:
        if name in inits:
            return inits[name]
        n = producer[name]
        if n.op_type == "Cast":
            return value(n.input[0]).astype(np.float32)
        if n.op_type == "Div":
            return (value(n.input[0]) / value(n.input[1])).astype(np.float32)
        if n.op_type == "Reshape":
            return value(n.input[0]).reshape(value(n.input[1]))
        raise ValueError(f"{name} is computed by {n.op_type}, not from initializers")

    out = {}
    for n in model.graph.node:
        if n.op_type != "MatMulNBits":
            continue
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        zp = value(n.input[3]) if len(n.input) > 3 and n.input[3] else None
        weight = n.input[1][: -len(".B")] if n.input[1].endswith(".B") else n.name
        out[weight] = QuantizedWeight(value(n.input[1]), value(n.input[2]), zp, a["K"], a["N"], a.get("bits", 4),
                                      a["block_size"])
    return out
