"""The fp32 reference: a transformers model built from a SourceModel's weights.

Used by evaluation (`edgeact eval --ref`), calibration (AWQ, sparsity) and the
tests. transformers' own model classes (Llama, Mistral, Qwen2, Qwen3, Phi3, Gemma2,
Gemma3) do the math, so this file only maps our config onto theirs.
"""
from __future__ import annotations

import torch

from .model import ConversionError, ModelConfig, SourceModel

_HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
               "gemma3": "Gemma3ForCausalLM"}
_CONFIG_CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
                   "phi3": "Phi3Config", "gemma2": "Gemma2Config", "gemma3": "Gemma3TextConfig"}
# Phi-3 keeps q/k/v and gate/up fused; SourceModel holds them split (readers split them)
_FUSED = {"self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                        "self_attn.v_proj.weight"),
          "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight")}


def hf_config(cfg: ModelConfig):
    import transformers

    if cfg.arch not in _HF_CLASSES:
        raise ConversionError(f"unsupported architecture {cfg.arch!r}; supported: {', '.join(_HF_CLASSES)}")
    config_cls = getattr(transformers, _CONFIG_CLASSES[cfg.arch])
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
    if cfg.arch == "qwen3":
        kw.update(attention_bias=cfg.attention_bias, use_sliding_window=False, sliding_window=None)
    if cfg.arch == "phi3":
        del kw["head_dim"]   # Phi3Config derives it from hidden / heads
        if cfg.hidden_size // cfg.num_heads != cfg.head_dim:
            raise ConversionError(f"phi3 needs head_dim = hidden / heads, got {cfg.head_dim}")
        orig = (cfg.rope_scaling or {}).get("original_max_position_embeddings")
        kw.update(partial_rotary_factor=cfg.partial_rotary_factor, sliding_window=None,
                  original_max_position_embeddings=orig or cfg.max_position_embeddings)
        if cfg.rope_scaling:
            kw["rope_scaling"] = {k: v for k, v in cfg.rope_scaling.items() if k != "original_max_position_embeddings"}
    if cfg.arch in ("gemma2", "gemma3"):
        kw.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=(cfg.attention_scale or 1.0) ** -2,
                  sliding_window=cfg.sliding_window or cfg.max_position_embeddings,
                  layer_types=cfg.layer_types or ["full_attention"] * cfg.num_layers,
                  final_logit_softcapping=cfg.final_logit_softcapping,
                  attn_logit_softcapping=cfg.attn_logit_softcapping)
        if cfg.arch == "gemma3":
            kw["rope_local_base_freq"] = cfg.rope_local_theta if cfg.rope_local_theta is not None else cfg.rope_theta
    c = config_cls(**kw)
    if cfg.arch in ("gemma2", "gemma3"):
        c.query_pre_attn_scalar = (cfg.attention_scale or 1.0) ** -2   # exact float, not an int
    return c


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
        fused = next((parts for suffix, parts in _FUSED.items() if name.endswith(suffix)), None)
        if fused:
            prefix = name[: -len(next(s for s in _FUSED if name.endswith(s)))]
            state[name] = torch.cat([torch.from_numpy(src.load(prefix + part)) for part in fused]).to(dtype)
            continue
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
        if hasattr(mod, "embed_scale"):   # Gemma's sqrt(hidden), a buffer also created on meta
            mod.register_buffer("embed_scale", torch.tensor(src.config.embedding_multiplier), persistent=False)
    return model.eval()
