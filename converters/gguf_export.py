"""SourceModel → llama.cpp GGUF (llama, qwen3 and gemma3 architectures), for the llama.cpp
baseline of `edgeact bench`: llama.cpp gets exactly the weights our converter reads.

The file carries no vocabulary (tokenizer model "none"): the benchmark feeds
token ids. q/k rows are permuted back into llama.cpp's interleaved-rotary order
(the inverse of what our readers undo); Gemma's norms are stored as 1 + w, as llama.cpp's
converter does. Gemma 3 files carry only what llama.cpp reads for it: the settings it fixes
itself (every 6th layer global, local rope base 1e4) must be the model's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .model import ConversionError, SourceModel

_QK_NORMS = {"self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"}
_GEMMA_NORMS = {"post_attention_layernorm.weight": "post_attention_norm.weight",
                "pre_feedforward_layernorm.weight": "ffn_norm.weight",
                "post_feedforward_layernorm.weight": "post_ffw_norm.weight"}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate_half row order → llama.cpp's interleaved pairs (per head)."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, -1).swapaxes(1, 2).reshape(w.shape)


def write_gguf(src: SourceModel, path: str | Path, *, dtype: str = "f16", context_length: int | None = None) -> Path:
    """Write `src` as an f16 (or f32) llama GGUF; quantize it with llama.cpp afterwards."""
    import gguf

    cfg = src.config
    if cfg.arch not in ("llama", "qwen3", "gemma3") or cfg.attention_bias:
        raise ConversionError(f"GGUF export covers the llama, qwen3 and gemma3 architectures without biases, "
                              f"not {cfg.arch!r}")
    if cfg.arch == "gemma3":
        fixed = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(cfg.num_layers)]
        if cfg.layer_types != fixed or cfg.rope_local_theta != 10000.0 or cfg.final_logit_softcapping \
                or abs(cfg.attention_scale - cfg.head_dim ** -0.5) > 1e-12:
            raise ConversionError("this Gemma 3 differs from the settings llama.cpp fixes for gemma3 GGUFs")
    if dtype not in ("f16", "f32"):
        raise ConversionError(f"GGUF export dtype must be f16 or f32, not {dtype!r}")
    np_dtype = np.float16 if dtype == "f16" else np.float32
    path = Path(path)
    w = gguf.GGUFWriter(str(path), cfg.arch)
    w.add_context_length(context_length or cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(cfg.vocab_size)
    if cfg.sliding_window:
        w.add_sliding_window(int(cfg.sliding_window))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("none")

    def add(name: str, arr: np.ndarray) -> None:
        # llama.cpp keeps 1-D norms in f32 whatever the file type.
        w.add_tensor(name, arr.astype(np_dtype if arr.ndim > 1 else np.float32))

    names = dict(_LAYER_NAMES)
    if cfg.qk_norm:
        names.update(_QK_NORMS)
    if cfg.sandwich_norms:
        del names["post_attention_layernorm.weight"]
        names.update(_GEMMA_NORMS)

    def load(name: str) -> np.ndarray:
        arr = src.load(name)
        return arr + np.float32(cfg.norm_offset) if cfg.norm_offset and name.endswith("norm.weight") else arr

    add("token_embd.weight", load("model.embed_tokens.weight"))
    for i in range(cfg.num_layers):
        for hf, gg in names.items():
            arr = load(f"model.layers.{i}.{hf}")
            if cfg.arch == "llama" and hf.startswith("self_attn.q_proj"):   # the others rotate halves
                arr = _to_interleaved(arr, cfg.num_heads)
            elif cfg.arch == "llama" and hf.startswith("self_attn.k_proj"):
                arr = _to_interleaved(arr, cfg.num_kv_heads)
            add(f"blk.{i}.{gg}", arr)
    add("output_norm.weight", load("model.norm.weight"))
    if not cfg.tie_word_embeddings:
        add("output.weight", load("lm_head.weight"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def quantize_gguf(src_path: str | Path, dst_path: str | Path, ftype: str = "q4_0", threads: int = 0) -> Path:
    """Quantize a GGUF with llama.cpp's own quantizer (needs llama-cpp-python)."""
    import ctypes

    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - depends on the optional install
        raise ConversionError("llama.cpp quantization needs llama-cpp-python (pip install llama-cpp-python)") from e
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src_path).encode(), str(dst_path).encode(), ctypes.byref(params))
    if rc != 0:
        raise ConversionError(f"llama.cpp failed to quantize {src_path} to {ftype} (code {rc})")
    return Path(dst_path)
