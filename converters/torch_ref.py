"""The fp32 reference: a transformers model built from a SourceModel's weights.

Used by evaluation (`edgeact eval --ref`), calibration (AWQ, sparsity) and the
tests. transformers' own LlamaForCausalLM / MistralForCausalLM /
Qwen2ForCausalLM do the math, so this file only maps our config onto theirs.
"""
from __future__ import annotations

import torch

from .model import ConversionError, ModelConfig, SourceModel

_HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def hf_config(cfg: ModelConfig):
    import transformers

    if cfg.arch not in _HF_CLASSES:
        raise ConversionError(f"unsupported architecture {cfg.arch!r}; supported: {', '.join(_HF_CLASSES)}")
    config_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                  "qwen2": transformers.Qwen2Config}[cfg.arch]
    kw = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id, eos_token_id=(cfg.eos_token_ids or [None])[0],
        pad_token_id=cfg.pad_token_id, torch_dtype="float32",
    )
    if cfg.arch == "llama":
        kw["attention_bias"] = cfg.attention_bias
        kw["mlp_bias"] = False
    if cfg.arch in ("mistral", "qwen2"):
        kw["sliding_window"] = None
    return config_cls(**kw)


def build_torch_model(src: SourceModel, dtype=torch.float32, progress: bool | None = False):
    """An eval-mode transformers model holding `src`'s weights (one copy, loaded tensor by tensor);
    progress: a bar per tensor (None: on a terminal)."""
    import transformers
    from tqdm import tqdm

    config = hf_config(src.config)
    config._attn_implementation = "eager"
    with torch.device("meta"):
        model = getattr(transformers, _HF_CLASSES[src.config.arch])(config)
    state = {}
    names = [n for n in model.state_dict() if not (n == "lm_head.weight" and src.config.tie_word_embeddings)]
    for name in tqdm(names, desc="loading the fp32 reference", unit="tensor",
                     disable=None if progress is None else not progress):
        if not src.has(name):
            raise ConversionError(f"source is missing tensor {name}")
        state[name] = torch.from_numpy(src.load(name)).to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if src.config.tie_word_embeddings:
        model.tie_weights()
    # Buffers (rotary inv_freq) were created on meta; rebuild them on the CPU.
    for mod in model.modules():
        if hasattr(mod, "inv_freq") and hasattr(mod, "rope_init_fn"):
            inv_freq, mod.attention_scaling = mod.rope_init_fn(mod.config, torch.device("cpu"))
            mod.register_buffer("inv_freq", inv_freq, persistent=False)
            mod.original_inv_freq = inv_freq
    return model.eval()
