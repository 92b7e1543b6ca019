"""GGUF (llama architecture) → SourceModel, via the `gguf` package's memmapped reader."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np

from ..model import ConversionError, ModelConfig, SourceModel
from .gguf_blocks import FLOAT_TYPES, import_weight
from .rotary_order import interleaved_to_half

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")


def _open(path: Path):
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the package raises ValueError/IndexError/... on damaged files
        raise ConversionError(f"{path}: not a readable GGUF file (truncated or corrupt?): {e}") from e
    size = path.stat().st_size
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:  # the reader's views would silently come up short
        raise ConversionError(f"{path}: truncated GGUF: tensor data needs {end} bytes but the file has {size}")
    return reader


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}"
    return None


def _rope_scaling(reader, arch: str) -> dict | None:
    kind = _field(reader, f"{arch}.rope.scaling.type")
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    if kind in (None, "none") or not factor or factor == 1.0:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        orig = _field(reader, f"{arch}.rope.scaling.original_context_length")
        out = {"rope_type": "yarn", "factor": float(factor)}
        if orig:
            out["original_max_position_embeddings"] = int(orig)
        return out
    raise ConversionError(f"unsupported GGUF rope scaling type {kind!r}; supported: linear, yarn")


def _config(reader, path: Path, names: set[str]) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ConversionError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: llama via GGUF "
            "(llama, mistral, qwen2 via Hugging Face folders; llama2.c .bin)")

    def need(key):
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise ConversionError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return v

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    head_dim = _field(reader, f"{arch}.attention.key_length") or _field(reader, f"{arch}.rope.dimension_count")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, f"{arch}.vocab_size") or (len(tokens.data) if tokens else None)
    if vocab is None:
        vocab = int(next(t.shape[1] for t in reader.tensors if t.name == "token_embd.weight"))
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    eos_ids = [int(i) for i in (eos, _field(reader, "tokenizer.ggml.eot_token_id")) if i is not None]
    bos, pad = _field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.padding_token_id")
    return ModelConfig(
        vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")), num_heads=heads, num_kv_heads=kv_heads,
        head_dim=int(head_dim or hidden // heads),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(reader, arch),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        arch="llama",
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=list(dict.fromkeys(eos_ids)),
        pad_token_id=None if pad is None else int(pad),
    )


def _loader(tensor, n_heads_for_rows: int | None):
    def load() -> np.ndarray:
        from gguf.quants import dequantize

        try:
            w = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        except NotImplementedError as e:
            raise ConversionError(f"GGUF tensor {tensor.name} has type {tensor.tensor_type.name}, "
                                  "which the gguf package cannot dequantize") from e
        if not w.flags.writeable:  # F32 tensors come back as views of the read-only memmap
            w = w.copy()
        # GGUF dims are listed fastest-first; dequantize returns numpy (row-major) order.
        w = w.reshape([int(d) for d in reversed(tensor.shape)])
        return interleaved_to_half(w, n_heads_for_rows) if n_heads_for_rows else w

    return load


def _blocks_loader(tensor, n_heads_for_rows: int | None):
    def load():
        N, K = (int(d) for d in reversed(tensor.shape))
        order = interleaved_to_half(np.arange(N), n_heads_for_rows) if n_heads_for_rows else None
        return import_weight(tensor.data, tensor.tensor_type, (N, K), row_order=order)

    return load


def read_gguf(path: str | Path) -> SourceModel:
    """A lazily dequantizing SourceModel for a llama-architecture GGUF file."""
    path = Path(path)
    reader = _open(path)
    names = {t.name for t in reader.tensors}
    cfg = _config(reader, path, names)
    if "rope_freqs.weight" in names:
        raise ConversionError(f"{path}: GGUF per-frequency rope factors (rope_freqs, Llama 3.1 style) are not supported")

    tensors, quantized = {}, {}
    for t in reader.tensors:
        hf = _hf_name(t.name)
        if hf is None:
            raise ConversionError(f"{path}: unexpected GGUF tensor {t.name!r} for a llama model")
        rows_heads = cfg.num_heads if ".attn_q." in t.name else cfg.num_kv_heads if ".attn_k." in t.name else None
        tensors[hf] = _loader(t, rows_heads)
        if len(t.shape) == 2 and t.tensor_type.name not in FLOAT_TYPES:
            quantized[hf] = _blocks_loader(t, rows_heads)

    add_bos = _field(reader, "tokenizer.ggml.add_bos_token")
    if add_bos is None:  # llama.cpp's default: SentencePiece vocabularies add BOS, BPE ones do not
        add_bos = _field(reader, "tokenizer.ggml.model") == "llama"
    tokenizer_json = None
    if "tokenizer.ggml.tokens" in reader.fields:
        from .tokenizer_convert import gguf_tokenizer_json

        tokenizer_json = gguf_tokenizer_json(path, bool(add_bos))
    return SourceModel(
        config=cfg, tensors=tensors, tokenizer_json=tokenizer_json,
        chat_template=_field(reader, "tokenizer.chat_template"), add_bos_token=bool(add_bos),
        provenance={"path": str(path), "format": "gguf",
                    "dtypes": dict(Counter(t.tensor_type.name for t in reader.tensors))},
        quantized=quantized,
    )

