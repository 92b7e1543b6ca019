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
