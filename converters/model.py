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

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from ..contract import HIDDEN_ACTS, ModelConfig  # noqa: F401  (edgeact.json's config: part of the folder contract)

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")


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
