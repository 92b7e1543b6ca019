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
Per-family extras, under their transformers names:
  model.layers.{i}.self_attn.{q,k}_norm.weight [head_dim]  (qk_norm: Gemma 3, Qwen3)
  model.layers.{i}.{pre,post}_feedforward_layernorm.weight (sandwich_norms: Gemma; there
      post_attention_layernorm is the norm after attention, pre_feedforward_layernorm the FFN's input norm)
Fused source tensors (Phi-3's qkv_proj, gate_up_proj) are split by the readers.
Norm weights keep the source convention: Gemma stores w and scales by (1 + w)
(norm_offset = 1); readers of files that store 1 + w (GGUF) subtract the 1.
q/k rows are in Hugging Face "rotate_half" order (readers of interleaved
formats such as GGUF and llama2.c undo the permutation).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping

import numpy as np

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")
HIDDEN_ACTS = ("silu", "gelu_tanh")


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
    # Family details (defaults: the Llama block). See docs/model-folder.md for the graph of each.
    hidden_act: str = "silu"                    # FFN gate activation: silu | gelu_tanh (Gemma)
    norm_offset: float = 0.0                    # RMSNorm scales by (norm_offset + w): 1 for Gemma
    embedding_multiplier: float = 1.0           # embedding rows scaled by this (Gemma: sqrt(hidden))
    sandwich_norms: bool = False                # norms after attention and after the FFN too (Gemma)
    qk_norm: bool = False                       # per-head RMSNorm of q and k before rotary (Gemma 3, Qwen3)
    attention_scale: float | None = None        # softmax scale; None = 1/sqrt(head_dim)
    sliding_window: int | None = None           # tokens a sliding layer sees, itself included
    layer_types: list[str] | None = None        # per layer: "full_attention" | "sliding_attention"
    rope_local_theta: float | None = None       # rope base of sliding layers (Gemma 3), unscaled
    partial_rotary_factor: float = 1.0          # fraction of head_dim that rotates (Phi)
    attn_logit_softcapping: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcapping: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)

    def is_sliding(self, layer: int) -> bool:
        return bool(self.sliding_window and self.layer_types and self.layer_types[layer] == "sliding_attention")

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

    def load(self, name: str) -> np.ndarray:
        return np.ascontiguousarray(self.tensors[name](), dtype=np.float32)

    def has(self, name: str) -> bool:
        return name in self.tensors


class ConversionError(Exception):
    """A problem with the user's input, reported as one line by the CLI."""
