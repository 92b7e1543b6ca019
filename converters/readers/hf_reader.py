"""Hugging Face folders (config.json + safetensors, single or sharded; Llama, Mistral, Qwen2/3, Phi-3, Gemma 2/3)
→ SourceModel."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..model import ConversionError, ModelConfig, SourceModel

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3", "Phi3ForCausalLM": "phi3", "Gemma2ForCausalLM": "gemma2",
                 "Gemma3ForCausalLM": "gemma3"}
_SOFTCAP_KEYS = ("attn_logit_softcapping", "final_logit_softcapping")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: cannot read JSON: {e}") from e


def _weight_files(folder: Path) -> dict[str, Path]:
    """tensor name → the safetensors file holding it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        wm = _read_json(index).get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise ConversionError(f"{index}: no weight_map")
        files = {name: folder / f for name, f in wm.items()}
        missing = sorted({str(p) for p in files.values() if not p.is_file()})
        if missing:
            raise ConversionError(f"{index} names missing shard(s): {', '.join(missing)}")
        return files
    single = folder / "model.safetensors"
    if not single.is_file():
        raise ConversionError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                              "(only safetensors weights are read)")
    from safetensors import safe_open

    try:
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    except Exception as e:  # safetensors raises its own error type on damaged headers
        raise ConversionError(f"{single}: not a readable safetensors file: {e}") from e


def _config(cfg: dict, folder: Path) -> ModelConfig:
    archs = cfg.get("architectures") or []
    arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise ConversionError(f"{folder}: architecture {', '.join(archs) if archs else cfg.get('model_type')!r} "
                              f"is not supported; supported: {', '.join(ARCHITECTURES)} "
                              "(gemma3, qwen3, qwen2, phi3, llama via GGUF; llama2.c .bin)")
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    eos = cfg.get("eos_token_id")
    eos_ids = [] if eos is None else list(eos) if isinstance(eos, list) else [eos]
    if arch == "mistral" and cfg.get("sliding_window") and cfg["sliding_window"] < cfg.get("max_position_embeddings", 0):
        # mistral keeps its clamp: past the window transformers' own Mistral gives sliding results
        max_pos = cfg["sliding_window"]
    else:
        max_pos = cfg.get("max_position_embeddings", 2048)
    if not arch.startswith("gemma"):
        for key in _SOFTCAP_KEYS:   # a soft-cap only Gemma 2 has: refuse it elsewhere rather than drop it
            if cfg.get(key):
                raise ConversionError(f"{folder}: {key}={cfg[key]} on a {arch} model is not supported")
    if arch == "gemma3" and cfg.get("attn_logit_softcapping"):
        # transformers' Gemma 3 never applies it (nor does llama.cpp): refuse rather than guess
        raise ConversionError(f"{folder}: attn_logit_softcapping={cfg['attn_logit_softcapping']} on a gemma3 model "
                              "is not supported (Gemma 3 attention has no soft-cap)")
    if cfg.get("use_sliding_window") and arch in ("qwen2", "qwen3"):
        raise ConversionError(f"{folder}: use_sliding_window=true on {arch} is not supported")
    rope_scaling = cfg.get("rope_scaling")
    out = dict(
        vocab_size=cfg["vocab_size"], hidden_size=hidden, intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"], num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=cfg.get("rope_theta", 10000.0), rope_scaling=rope_scaling,
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", arch.startswith("gemma"))),
        attention_bias=True if arch == "qwen2" else bool(cfg.get("attention_bias", False)),
        arch=arch, bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids, pad_token_id=cfg.get("pad_token_id"),
    )
    if arch == "qwen3":
        out["qk_norm"] = True
    if arch == "phi3":
        out["partial_rotary_factor"] = float(cfg.get("partial_rotary_factor") or 1.0)
        if rope_scaling and cfg.get("original_max_position_embeddings"):
            out["rope_scaling"] = {**rope_scaling,
                                   "original_max_position_embeddings": cfg["original_max_position_embeddings"]}
        if cfg.get("sliding_window") and cfg["sliding_window"] < max_pos:
            out["max_position_embeddings"] = cfg["sliding_window"]   # as mistral: no sliding layers in phi3's graph
    if arch.startswith("gemma"):
        act = cfg.get("hidden_activation") or cfg.get("hidden_act")
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConversionError(f"{folder}: Gemma hidden activation {act!r} is not supported; supported: "
                                  "gelu_pytorch_tanh")
        if cfg.get("use_bidirectional_attention"):
            raise ConversionError(f"{folder}: use_bidirectional_attention=true is not supported (decoder only)")
        pattern = cfg.get("sliding_window_pattern", 6 if arch == "gemma3" else 2)
        layer_types = cfg.get("layer_types") or [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(out["num_layers"])]
        if arch == "gemma2" and not cfg.get("layer_types"):   # Gemma 2 alternates, sliding first
            layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(out["num_layers"])]
        out.update(hidden_act="gelu_tanh", norm_offset=1.0, embedding_multiplier=float(np.float32(hidden ** 0.5)),
                   sandwich_norms=True, qk_norm=arch == "gemma3",
                   attention_scale=float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5,
                   sliding_window=cfg.get("sliding_window"), layer_types=layer_types,
                   rope_local_theta=float(cfg.get("rope_local_base_freq", 10000.0)) if arch == "gemma3" else None,
                   attn_logit_softcapping=cfg.get("attn_logit_softcapping"),
                   final_logit_softcapping=cfg.get("final_logit_softcapping"))
    return ModelConfig(**out)


def _split_fused(tensors: dict, cfg: ModelConfig) -> dict:
    """Phi-3's fused qkv_proj and gate_up_proj → the separate q/k/v and gate/up tensors (row slices)."""
    q, kv, ff = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    out = {}
    for name, load in tensors.items():
        if name.endswith("self_attn.qkv_proj.weight"):
            base = name[: -len("qkv_proj.weight")]
            for part, (a, b) in (("q_proj", (0, q)), ("k_proj", (q, q + kv)), ("v_proj", (q + kv, q + 2 * kv))):
                out[f"{base}{part}.weight"] = (lambda load=load, a=a, b=b: load()[a:b])
        elif name.endswith("mlp.gate_up_proj.weight"):
            base = name[: -len("gate_up_proj.weight")]
            out[f"{base}gate_proj.weight"] = (lambda load=load: load()[:ff])
            out[f"{base}up_proj.weight"] = (lambda load=load: load()[ff:])
        else:
            out[name] = load
    return out


def _source_dtypes(files: dict[str, Path]) -> dict[str, int]:
    from collections import Counter

    from safetensors import safe_open

    counts: Counter = Counter()
    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        with safe_open(str(f), framework="pt") as h:
            counts.update(h.get_slice(n).get_dtype() for n in names)
    return dict(counts)


def _loader(file: Path, name: str):
    def load() -> np.ndarray:
        from safetensors import safe_open

        # framework="pt": numpy has no bfloat16, torch converts bf16/fp16 → fp32 exactly.
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(name).float().numpy()

    return load


def read_hf_folder(folder: str | Path) -> SourceModel:
    """A SourceModel over a transformers folder of one of ARCHITECTURES."""
    folder = Path(folder)
    raw = _read_json(folder / "config.json")
    try:
        cfg = _config(raw, folder)
    except KeyError as e:
        raise ConversionError(f"{folder / 'config.json'} lacks {e.args[0]!r}") from e
    if raw.get("mlp_bias"):
        raise ConversionError(f"{folder}: mlp_bias=true is not supported")
    files = _weight_files(folder)
    tensors = _split_fused({name: _loader(f, name) for name, f in files.items()
                            if not name.endswith("rotary_emb.inv_freq")}, cfg)
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    elif "lm_head.weight" not in tensors:
        raise ConversionError(f"{folder}: config says tie_word_embeddings=false but there is no lm_head.weight")

    tok_json = folder / "tokenizer.json"
    tok_cfg = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    chat = tok_cfg.get("chat_template")
    if chat is None and (folder / "chat_template.jinja").is_file():
        chat = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(chat, list):  # named templates: keep the default one
        chat = next((t["template"] for t in chat if t.get("name") == "default"), None)
    return SourceModel(
        config=cfg, tensors=tensors,
        tokenizer_json=tok_json.read_text(encoding="utf-8") if tok_json.is_file() else None,
        chat_template=chat,
        add_bos_token=bool(tok_cfg.get("add_bos_token", cfg.arch not in ("qwen2", "qwen3"))),
        provenance={"path": str(folder), "format": "hf", "dtypes": _source_dtypes(
            {n: f for n, f in files.items() if not n.endswith("rotary_emb.inv_freq")
             and not (cfg.tie_word_embeddings and n == "lm_head.weight")})},
    )
