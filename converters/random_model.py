"""Random-weight SourceModels of named shapes, for tests and speed work.

Tensors are lazy and deterministic: each is drawn from a generator seeded by
(seed, crc32(name)), so any one tensor can be reloaded without the others.
Linear weights have std 1/sqrt(in_features) (about 0.02 at real sizes) and
norm weights sit near 1, which keeps attention scores and logits O(1) even in
tiny models, so tests exercise softmax and greedy choices meaningfully.
"""
from __future__ import annotations

import zlib
from dataclasses import replace

import numpy as np

from .model import ConversionError, ModelConfig, SourceModel

def _gemma3(layers: int, **kw) -> ModelConfig:
    """Gemma 3's block: llama.cpp's fixed settings (every 6th layer global, local rope base 1e4, scalar = head_dim)."""
    return ModelConfig(num_layers=layers, arch="gemma3", hidden_act="gelu_tanh", norm_offset=1.0,
                       embedding_multiplier=float(np.float32(kw["hidden_size"] ** 0.5)), sandwich_norms=True,
                       qk_norm=True, attention_scale=kw["head_dim"] ** -0.5, rope_local_theta=10000.0,
                       layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(layers)],
                       tie_word_embeddings=True, rms_norm_eps=1e-6, bos_token_id=2, eos_token_ids=[1, 106],
                       pad_token_id=0, **kw)


SHAPES: dict[str, ModelConfig] = {
    # Dims deliberately not multiples of 32 (ragged quantization blocks), GQA 3:1.
    "tiny": ModelConfig(vocab_size=300, hidden_size=48, intermediate_size=100, num_layers=2, num_heads=3,
                        num_kv_heads=1, head_dim=16, rope_theta=10000.0, max_position_embeddings=256,
                        bos_token_id=1, eos_token_ids=[2]),
    "smollm2-135m": ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                                num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
                                max_position_embeddings=8192, tie_word_embeddings=True,
                                bos_token_id=1, eos_token_ids=[2]),
    "tinyllama-1.1b": ModelConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
                                  num_heads=32, num_kv_heads=4, head_dim=64, rope_theta=10000.0,
                                  max_position_embeddings=2048, bos_token_id=1, eos_token_ids=[2]),
    # the families beside Llama: tiny ones for tests, real shapes for speed work
    "gemma3-tiny": _gemma3(6, vocab_size=300, hidden_size=64, intermediate_size=96, num_heads=4, num_kv_heads=1,
                           head_dim=32, sliding_window=8, rope_theta=1e6, max_position_embeddings=256),
    "qwen3-tiny": ModelConfig(vocab_size=300, hidden_size=48, intermediate_size=100, num_layers=2, num_heads=3,
                              num_kv_heads=1, head_dim=16, rope_theta=1e6, max_position_embeddings=256, arch="qwen3",
                              qk_norm=True, rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_ids=[2]),
    "gemma3-270m": _gemma3(18, vocab_size=262144, hidden_size=640, intermediate_size=2048, num_heads=4,
                           num_kv_heads=1, head_dim=256, sliding_window=512, rope_theta=1e6,
                           max_position_embeddings=32768),
    "qwen3-0.6b": ModelConfig(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28,
                              num_heads=16, num_kv_heads=8, head_dim=128, rope_theta=1e6, max_position_embeddings=40960,
                              arch="qwen3", qk_norm=True, rms_norm_eps=1e-6, tie_word_embeddings=True,
                              bos_token_id=None, eos_token_ids=[151645, 151643]),
    "llama3.2-1b": ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                               num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
                               rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                               max_position_embeddings=131072, tie_word_embeddings=True, bos_token_id=128000,
                               eos_token_ids=[128001, 128008, 128009]),
    "llama-7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                            num_heads=32, num_kv_heads=32, head_dim=128, rope_theta=10000.0,
                            max_position_embeddings=4096, bos_token_id=1, eos_token_ids=[2]),
}


def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a SourceModel of this config holds, with its HF shape."""
    h, hd = cfg.hidden_size, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (cfg.num_heads * hd, h)
        shapes[p + "self_attn.k_proj.weight"] = (cfg.num_kv_heads * hd, h)
        shapes[p + "self_attn.v_proj.weight"] = (cfg.num_kv_heads * hd, h)
        if cfg.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (cfg.num_heads * hd,)
            shapes[p + "self_attn.k_proj.bias"] = (cfg.num_kv_heads * hd,)
            shapes[p + "self_attn.v_proj.bias"] = (cfg.num_kv_heads * hd,)
        shapes[p + "self_attn.o_proj.weight"] = (h, cfg.num_heads * hd)
        if cfg.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        if cfg.sandwich_norms:
            shapes[p + "pre_feedforward_layernorm.weight"] = (h,)
            shapes[p + "post_feedforward_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (cfg.intermediate_size, h)
        shapes[p + "mlp.up_proj.weight"] = (cfg.intermediate_size, h)
        shapes[p + "mlp.down_proj.weight"] = (h, cfg.intermediate_size)
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def _loader(name: str, shape: tuple[int, ...], seed: int, norm_offset: float):
    def load() -> np.ndarray:
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        x = rng.standard_normal(shape, dtype=np.float32)
        if name.endswith("norm.weight"):   # the effective scale sits near 1 (Gemma stores it minus 1)
            return np.float32(1.0 - norm_offset) + 0.1 * x
        if name.endswith(".bias"):
            return 0.1 * x
        return x * np.float32(1.0 / np.sqrt(shape[-1]))
    return load


def random_source(config_or_shape: str | ModelConfig, seed: int = 0, **overrides) -> SourceModel:
    """A lazy random SourceModel: a named shape (see SHAPES) or a ModelConfig; `overrides` replace config fields."""
    if isinstance(config_or_shape, str):
        if config_or_shape not in SHAPES:
            raise ConversionError(f"unknown random shape {config_or_shape!r}; known: {', '.join(SHAPES)}")
        cfg = replace(SHAPES[config_or_shape], **overrides)
        label = config_or_shape
    elif isinstance(config_or_shape, ModelConfig):
        cfg = replace(config_or_shape, **overrides)
        label = "config"
    else:
        raise ConversionError(f"random_source takes a shape name or a ModelConfig, got {type(config_or_shape).__name__}")
    tensors = {n: _loader(n, s, seed, cfg.norm_offset) for n, s in tensor_shapes(cfg).items()}
    return SourceModel(config=cfg, tensors=tensors,
                       provenance={"path": f"random:{label}", "format": "random", "seed": seed,
                                   "dtypes": {"F32": len(tensors)}})
