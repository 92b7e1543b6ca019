"""The in-memory description every reader produces and every writer consumes.

A reader never materialises all weights at once: `SourceModel.tensors` maps a
Hugging Face-style tensor name to a zero-argument loader returning one fp32
numpy array, so converting holds about one tensor (plus the output) in memory.

Tensor names and layouts (Hugging Face LlamaForCausalLM convention, [out, in]):
  model.embed_tokens.weight                    [vocab, hidden]
  model.layers.{i}.input_layernorm.weight      [hidden]
  model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
  model.layers.{i}.post_attention_layernorm.weight
  model.layers.{i}.mlp.{gate,up,down}_proj.weight
  model.norm.weight                            [hidden]
  lm_head.weight                               [vocab, hidden]  (absent when tied)
q/k rows are in Hugging Face "rotate_half" order (readers of interleaved
formats such as GGUF and llama2.c undo the permutation).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping

import numpy as np

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None      # as in HF config.json (e.g. llama3, linear)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False          # qwen2 has q/k/v biases
    arch: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class SourceModel:
    config: ModelConfig
    tensors: Mapping[str, Callable[[], np.ndarray]]
    tokenizer_json: str | None = None     # Hugging Face tokenizers JSON, if known
    chat_template: str | None = None      # jinja2 template, if the source has one
    add_bos_token: bool = False
    provenance: dict = field(default_factory=dict)  # source path, format, source dtype...
    # name → loader of the tensor's own quantized blocks as a MatMulNBits weight (readers/gguf_blocks.py
    # Imported), for sources stored quantized: converting with quant="source" keeps them unrounded
    quantized: Mapping[str, Callable[[], object]] = field(default_factory=dict)

    def load(self, name: str) -> np.ndarray:
        return np.ascontiguousarray(self.tensors[name](), dtype=np.float32)

    def has(self, name: str) -> bool:
        return name in self.tensors


class ConversionError(Exception):
    """A problem with the user's input, reported as one line by the CLI."""
