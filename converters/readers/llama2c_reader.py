"""llama2.c checkpoints (`.bin`, legacy and version-1 fp32 formats) → SourceModel.

Weights are fp32 [out, in] blocks laid end to end; each tensor is a memmap
slice, so nothing is read until a loader runs. llama2.c's rotary pairs
adjacent q/k components, so q/k rows are reordered to rotate_half order.
"""
from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np

from ..model import ConversionError, ModelConfig, SourceModel
from .rotary_order import interleaved_to_half

V1_MAGIC = 0x616B3432  # "ak42"
V1_HEADER_BYTES = 256
LEGACY_HEADER_BYTES = 7 * 4


def _header(path: Path, data: np.memmap) -> tuple[dict, int, bool]:
    """(dims, header size, legacy?) from the start of the file."""
    if len(data) < LEGACY_HEADER_BYTES:
        raise ConversionError(f"{path}: {len(data)} bytes is too short for a llama2.c checkpoint header")
    magic = struct.unpack_from("<I", data, 0)[0]
    if magic == V1_MAGIC:
        if len(data) < V1_HEADER_BYTES:
            raise ConversionError(f"{path}: truncated llama2.c version-1 header ({len(data)} of {V1_HEADER_BYTES} bytes)")
        version = struct.unpack_from("<i", data, 4)[0]
        if version != 1:
            raise ConversionError(f"{path}: llama2.c checkpoint version {version} is not supported "
                                  "(only fp32 legacy and version 1 are)")
        vals = struct.unpack_from("<7i", data, 8)
        shared = bool(data[8 + 28])
        legacy = False
        header = V1_HEADER_BYTES
    else:
        vals = struct.unpack_from("<7i", data, 0)
        shared = vals[5] > 0  # legacy format: a negative vocab size marks an unshared classifier
        vals = (*vals[:5], abs(vals[5]), vals[6])
        legacy, header = True, LEGACY_HEADER_BYTES
    dims = dict(zip(("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"), vals))
    bad = [k for k, v in dims.items() if v <= 0 or v > 1 << 24]
    if bad or dims["dim"] % dims["n_heads"] or dims["n_heads"] % dims["n_kv_heads"]:
        raise ConversionError(f"{path}: not a llama2.c checkpoint (implausible header {dims})")
    dims["shared_classifier"] = shared
    return dims, header, legacy


def _layout(d: dict, legacy: bool) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) in file order; names are llama2.c's, per layer shapes stacked on axis 0."""
    L, dim, hid, head = d["n_layers"], d["dim"], d["hidden_dim"], d["dim"] // d["n_heads"]
    q, kv = d["n_heads"] * head, d["n_kv_heads"] * head
    emb, norms = ("tok", (d["vocab_size"], dim)), [("rms_att", (L, dim)), ("rms_ffn", (L, dim))]
    mats = [("wq", (L, q, dim)), ("wk", (L, kv, dim)), ("wv", (L, kv, dim)), ("wo", (L, dim, q)),
            ("w1", (L, hid, dim)), ("w2", (L, dim, hid)), ("w3", (L, hid, dim))]
    if legacy:
        freqs = [("freq_cis_real", (d["seq_len"], head // 2)), ("freq_cis_imag", (d["seq_len"], head // 2))]
        order = [emb, norms[0], *mats[:4], norms[1], *mats[4:], ("rms_final", (dim,)), *freqs]
    else:
        order = [*norms, ("rms_final", (dim,)), emb, *mats]
    if not d["shared_classifier"]:
        order.append(("wcls", (d["vocab_size"], dim)))
    return order


_HF = {"rms_att": "input_layernorm.weight", "rms_ffn": "post_attention_layernorm.weight",
       "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
       "wo": "self_attn.o_proj.weight", "w1": "mlp.gate_proj.weight", "w2": "mlp.down_proj.weight",
       "w3": "mlp.up_proj.weight"}


def read_llama2c(path: str | Path, tokenizer: str | Path | None = None) -> SourceModel:
    """A SourceModel over a llama2.c checkpoint; `tokenizer` defaults to tokenizer.bin beside it."""
    path = Path(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    d, header, legacy = _header(path, data)
    layout = _layout(d, legacy)
    expected = header + 4 * sum(int(np.prod(s)) for _, s in layout)
    if len(data) != expected:
        raise ConversionError(f"{path}: llama2.c header {d} implies {expected} bytes but the file has {len(data)}"
                              + (" (truncated)" if len(data) < expected else ""))

    blocks, off = {}, header
    for name, shape in layout:
        n = int(np.prod(shape))
        blocks[name] = (off, shape)
        off += 4 * n

    def view(name):
        o, shape = blocks[name]
        return np.frombuffer(data, dtype="<f4", count=int(np.prod(shape)), offset=o).reshape(shape)

    def make(name, layer=None, heads=None):
        def load():
            w = view(name) if layer is None else view(name)[layer]
            return interleaved_to_half(w, heads) if heads else np.array(w, dtype=np.float32)
        return load

    tensors = {"model.embed_tokens.weight": make("tok"), "model.norm.weight": make("rms_final")}
    if not d["shared_classifier"]:
        tensors["lm_head.weight"] = make("wcls")
    for i in range(d["n_layers"]):
        for short, hf in _HF.items():
            heads = d["n_heads"] if short == "wq" else d["n_kv_heads"] if short == "wk" else None
            tensors[f"model.layers.{i}.{hf}"] = make(short, i, heads)

    cfg = ModelConfig(
        vocab_size=d["vocab_size"], hidden_size=d["dim"], intermediate_size=d["hidden_dim"],
        num_layers=d["n_layers"], num_heads=d["n_heads"], num_kv_heads=d["n_kv_heads"],
        head_dim=d["dim"] // d["n_heads"], rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=d["seq_len"], tie_word_embeddings=d["shared_classifier"],
        arch="llama", bos_token_id=1, eos_token_ids=[2],
    )
    return SourceModel(config=cfg, tensors=tensors, tokenizer_json=_tokenizer(path, tokenizer, d["vocab_size"]),
                       add_bos_token=True,
                       provenance={"path": str(path), "format": "llama2c" if legacy else "llama2c-v1",
                                   "dtypes": {"F32": len(tensors)}})


def _tokenizer(ckpt: Path, tokenizer: str | Path | None, vocab_size: int) -> str | None:
    tok_path = Path(tokenizer) if tokenizer is not None else ckpt.with_name("tokenizer.bin")
    if not tok_path.is_file():
        if tokenizer is not None:
            raise ConversionError(f"tokenizer file {tok_path} does not exist")
        warnings.warn(f"no tokenizer.bin beside {ckpt} (pass --tokenizer); "
                      "the converted model will run on token ids only")
        return None
    from .tokenizer_convert import llama2c_tokenizer_json, read_llama2c_vocab

    n = len(read_llama2c_vocab(tok_path))
    if n != vocab_size:
        raise ConversionError(f"tokenizer {tok_path} has {n} tokens but the checkpoint's vocab_size is {vocab_size}")
    return llama2c_tokenizer_json(tok_path)
