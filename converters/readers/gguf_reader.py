"""GGUF (llama, qwen2, qwen3, phi3, gemma3 architectures) → SourceModel, via the `gguf` package's memmapped reader.

llama.cpp's converter reorders llama's q/k rows for interleaved rotary (undone here; the
others rotate halves), stores Gemma's norm weights as 1 + w (the 1 is taken off here, the
transformers convention), and fuses Phi-3's q/k/v and gate/up (split here). Settings the
GGUF metadata does not carry are llama.cpp's fixed ones for the architecture.
"""
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
_QK_NORM_NAMES = {"attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight"}
_GEMMA_NAMES = {"post_attention_norm.weight": "post_attention_layernorm.weight",
                "ffn_norm.weight": "pre_feedforward_layernorm.weight",
                "post_ffw_norm.weight": "post_feedforward_layernorm.weight"}
ARCH_BLOCK_NAMES = {
    "llama": _BLOCK_NAMES,
    "qwen2": _BLOCK_NAMES,
    "qwen3": {**_BLOCK_NAMES, **_QK_NORM_NAMES},
    "phi3": {**_BLOCK_NAMES, "attn_qkv.weight": "self_attn.qkv_proj.weight"},
    "gemma3": {**_BLOCK_NAMES, **_QK_NORM_NAMES, **_GEMMA_NAMES},
}
SUPPORTED_GGUF = tuple(ARCH_BLOCK_NAMES)
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")


def open_reader(path) -> "gguf.GGUFReader":
    """gguf.GGUFReader on `path`, its fields parsed from a plain ndarray view of the file's map:
    each slice of the np.memmap itself runs a Python hook, and a tokenizer's vocabulary is some
    10^5 slices (SmolLM2's 49k-token file: 1.6 s to parse, 0.5 s this way). The same fields and
    tensor views as the library's reader (tests/test_gguf_import.py checks)."""
    return _reader_class()(str(path))


def _reader_class():
    import gguf

    class Reader(gguf.GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)
            count = int(count)
            arr = plain[offset:offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return Reader


def _open(path: Path):
    reader_class = _reader_class()   # outside the try: without gguf, the CLI names the extra to install
    try:
        reader = reader_class(str(path))
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


def _hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    names = ARCH_BLOCK_NAMES[arch]
    if m and m.group(2) in names:
        return f"model.layers.{m.group(1)}.{names[m.group(2)]}"
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


def _token_id(reader, piece: str) -> int | None:
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        return None
    for i, idx in enumerate(tokens.data):
        if bytes(tokens.parts[idx]) == piece.encode():
            return i
    return None


# end-of-turn pieces per family, stop tokens beside the file's eos (base GGUFs often name only <eos>)
_TURN_END = {"gemma3": ("<end_of_turn>",), "qwen2": ("<|im_end|>", "<|endoftext|>"),
             "qwen3": ("<|im_end|>", "<|endoftext|>"), "llama": ("<|eot_id|>", "<|eom_id|>"),
             "phi3": ("<|end|>", "<|endoftext|>")}


def _config(reader, path: Path, names: set[str]) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in ARCH_BLOCK_NAMES:
        raise ConversionError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported via GGUF: {', '.join(SUPPORTED_GGUF)} "
            "(and llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3 via Hugging Face folders; llama2.c .bin)")

    def need(key):
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise ConversionError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return v

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    head_dim = _field(reader, f"{arch}.attention.key_length") or (
        _field(reader, f"{arch}.rope.dimension_count") if arch == "llama" else None)
    head_dim = int(head_dim or hidden // heads)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, f"{arch}.vocab_size") or (len(tokens.data) if tokens else None)
    if vocab is None:
        vocab = int(next(t.shape[1] for t in reader.tensors if t.name == "token_embd.weight"))
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    eos_ids = [int(i) for i in (eos, _field(reader, "tokenizer.ggml.eot_token_id")) if i is not None]
    eos_ids += [i for i in (_token_id(reader, p) for p in _TURN_END.get(arch, ())) if i is not None]
    bos, pad = _field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.padding_token_id")
    max_pos = int(_field(reader, f"{arch}.context_length", 2048))
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):   # Gemma 2 keys: refuse, never drop
        if _field(reader, f"{arch}.{key}"):
            raise ConversionError(f"{path}: GGUF {arch}.{key} (soft-capping) is not supported for {arch}")
    extra: dict = {}
    rope_scaling = _rope_scaling(reader, arch)
    if arch == "qwen3":
        extra["qk_norm"] = True
    if arch == "phi3":
        rot = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
        extra["partial_rotary_factor"] = rot / head_dim
        if "rope_factors_long.weight" in names:
            orig = _field(reader, f"{arch}.rope.scaling.original_context_length")
            if not orig:
                raise ConversionError(f"{path}: longrope factors without {arch}.rope.scaling.original_context_length")
            rope_scaling = {"rope_type": "longrope", "original_max_position_embeddings": int(orig),
                            "short_factor": _factors(reader, "rope_factors_short.weight"),
                            "long_factor": _factors(reader, "rope_factors_long.weight")}
            attn_factor = _field(reader, f"{arch}.rope.scaling.attn_factor")
            if attn_factor:
                rope_scaling["attention_factor"] = float(attn_factor)
        window = _field(reader, f"{arch}.attention.sliding_window")
        if window and int(window) < max_pos:   # as the HF reader: the graph keeps phi3 within one window
            max_pos = int(window)
    if arch == "gemma3":
        # llama.cpp's fixed Gemma 3 settings: every 6th layer global, local rope base 1e4,
        # query_pre_attn_scalar = head_dim (hidden / heads for the 62-layer 27B)
        layers = int(need("block_count"))
        scalar = hidden // heads if layers == 62 else head_dim
        window = _field(reader, f"{arch}.attention.sliding_window")
        extra.update(hidden_act="gelu_tanh", norm_offset=1.0, embedding_multiplier=float(np.float32(hidden ** 0.5)),
                     sandwich_norms=True, qk_norm=True, attention_scale=float(scalar) ** -0.5,
                     sliding_window=int(window) if window else None,
                     layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(layers)],
                     rope_local_theta=10000.0)
    return ModelConfig(
        vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")), num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=max_pos,
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        arch=arch,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=list(dict.fromkeys(eos_ids)),
        pad_token_id=None if pad is None else int(pad),
        **extra,
    )


def _llama3_rope(reader, cfg: ModelConfig, path: Path) -> dict:
    """Llama 3.x rope scaling from llama.cpp's rope_freqs (per-frequency divisors it computes from the HF
    config and does not keep): the Llama 3.1/3.2 parameters that reproduce them, else a refusal."""
    from dataclasses import replace

    from ..rope_cache import inv_freq

    got = np.asarray(_factors(reader, "rope_freqs.weight"), np.float64)
    base = inv_freq(replace(cfg, rope_scaling=None))
    if got.shape != base.shape:
        raise ConversionError(f"{path}: rope_freqs has {got.size} entries, expected {base.size}")
    rs = {"rope_type": "llama3", "factor": float(got.max()), "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    want = base / inv_freq(replace(cfg, rope_scaling=rs))
    if not np.allclose(got, want, rtol=1e-5, atol=0):
        raise ConversionError(f"{path}: rope_freqs are not Llama 3's frequency scaling (factor {rs['factor']:g}, "
                              "low 1, high 4, original context 8192); not supported")
    return rs


def _factors(reader, name: str) -> list[float]:
    t = next(t for t in reader.tensors if t.name == name)
    return [float(x) for x in np.asarray(t.data, np.float32).reshape(-1)]


def _loader(tensor, n_heads_for_rows: int | None, offset: float = 0.0):
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
        if offset:
            w = w - np.float32(offset)
        return interleaved_to_half(w, n_heads_for_rows) if n_heads_for_rows else w

    return load


def _split_phi3(tensors: dict, cfg: ModelConfig, names: set[str]) -> dict:
    """llama.cpp's Phi-3: attn_qkv holds q, k, v rows; ffn_up holds gate then up rows (no ffn_gate)."""
    from .hf_reader import _split_fused

    out = {}
    for name, load in tensors.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", name)
        if m and f"blk.{m.group(1)}.ffn_gate.weight" not in names:
            name = name.replace("up_proj", "gate_up_proj")
        out[name] = load
    return _split_fused(out, cfg)


def _blocks_loader(tensor, n_heads_for_rows: int | None):
    def load():
        N, K = (int(d) for d in reversed(tensor.shape))
        order = interleaved_to_half(np.arange(N), n_heads_for_rows) if n_heads_for_rows else None
        return import_weight(tensor.data, tensor.tensor_type, (N, K), row_order=order)

    return load


def read_gguf(path: str | Path) -> SourceModel:
    """A lazily dequantizing SourceModel for a GGUF file of one of SUPPORTED_GGUF."""
    path = Path(path)
    reader = _open(path)
    names = {t.name for t in reader.tensors}
    cfg = _config(reader, path, names)
    if "rope_freqs.weight" in names:
        if cfg.arch != "llama" or cfg.rope_scaling:
            raise ConversionError(f"{path}: GGUF rope_freqs on a {cfg.arch} model with rope scaling "
                                  f"{cfg.rope_scaling} is not supported")
        cfg.rope_scaling = _llama3_rope(reader, cfg, path)

    arch = cfg.arch
    tensors, quantized = {}, {}
    for t in reader.tensors:
        if (arch == "phi3" and t.name.startswith("rope_factors_")) or t.name == "rope_freqs.weight":
            continue   # read into rope_scaling
        hf = _hf_name(t.name, arch)
        if hf is None:
            raise ConversionError(f"{path}: unexpected GGUF tensor {t.name!r} for a {arch} model")
        permute = arch == "llama"
        rows_heads = (cfg.num_heads if ".attn_q." in t.name else cfg.num_kv_heads if ".attn_k." in t.name
                      else None) if permute else None
        offset = cfg.norm_offset if t.name.endswith("norm.weight") else 0.0
        tensors[hf] = _loader(t, rows_heads, offset)
        # Phi-3's fused tensors are split from floats (their blocks do not split along rows cleanly)
        fused = arch == "phi3" and (".attn_qkv." in t.name or (
            ".ffn_up." in t.name and t.name.replace("ffn_up", "ffn_gate") not in names))
        if len(t.shape) == 2 and t.tensor_type.name not in FLOAT_TYPES and not fused:
            quantized[hf] = _blocks_loader(t, rows_heads)
    if arch == "phi3":
        tensors = _split_phi3(tensors, cfg, names)

    add_bos = _field(reader, "tokenizer.ggml.add_bos_token")
    if add_bos is None:  # llama.cpp's default: SentencePiece vocabularies add BOS, BPE ones do not
        add_bos = _field(reader, "tokenizer.ggml.model") == "llama"
    tokenizer_json = None
    if "tokenizer.ggml.tokens" in reader.fields:
        from .tokenizer_convert import gguf_gemma_tokenizer_json, gguf_tokenizer_json

        if cfg.arch == "gemma3" and _field(reader, "tokenizer.ggml.model") == "llama":
            tokenizer_json = gguf_gemma_tokenizer_json(path, bool(add_bos), reader)
        else:
            tokenizer_json = gguf_tokenizer_json(path, bool(add_bos), reader)
    return SourceModel(
        config=cfg, tensors=tensors, tokenizer_json=tokenizer_json,
        chat_template=_field(reader, "tokenizer.chat_template"), add_bos_token=bool(add_bos),
        provenance={"path": str(path), "format": "gguf",
                    "dtypes": dict(Counter(t.tensor_type.name for t in reader.tensors))},
        quantized=quantized,
    )

