"""Model families beyond the Llama block (Gemma 2/3, Qwen3, Phi-3, Llama 3.x rope), each against transformers.

Random-weight models are built by transformers from its own config classes and saved as
Hugging Face folders (or written as GGUF the way llama.cpp's converter lays them out); our
readers and the fp32 graph on onnxruntime must reproduce transformers' logits through a
prefill and single-token decode steps, past the sliding window where a model has one.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from edgeact.converters.model import ConversionError
from edgeact.converters.onnx_writer import write_onnx
from edgeact.converters.readers import read_source
from test_writer import check_against_torch

ort = pytest.importorskip("onnxruntime")
TOL = 1e-4   # max |Δlogit|, fp32
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, initializer_range=0.1)


def gemma3_config(**kw):
    c = dict(SMALL, num_hidden_layers=4, head_dim=32, sliding_window=8, rope_local_base_freq=100.0,
             rope_theta=10000.0, query_pre_attn_scalar=24,
             layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"])
    c.update(kw)
    return transformers.Gemma3TextConfig(**c)


FAMILIES = {
    # the window (8) is shorter than prompt + decode (12 + 16): decode runs past it
    "gemma3": lambda: gemma3_config(),
    "gemma3-softcap-linear-rope": lambda: gemma3_config(final_logit_softcapping=3.0,
                                                         rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "gemma3-head-dim-24": lambda: gemma3_config(head_dim=24, query_pre_attn_scalar=24),
    "gemma2-softcap": lambda: transformers.Gemma2Config(**SMALL, num_hidden_layers=3, head_dim=16, sliding_window=8,
                                                        query_pre_attn_scalar=16, attn_logit_softcapping=2.0,
                                                        final_logit_softcapping=3.0),
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, num_hidden_layers=2, head_dim=32, rope_theta=1e6),
    # head_dim 8: padded to 16 in the graph, the q/k norm folds the padding into its weight and epsilon
    "qwen3-head-dim-8": lambda: transformers.Qwen3Config(**SMALL, num_hidden_layers=2, head_dim=8),
    "llama3-rope": lambda: transformers.LlamaConfig(**SMALL, num_hidden_layers=2, rope_theta=500000.0,
                                                    rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True),
    "phi3-partial-rotary": lambda: transformers.Phi3Config(**SMALL, num_hidden_layers=2, partial_rotary_factor=0.5,
                                                           pad_token_id=0),
    "phi3-longrope": lambda: transformers.Phi3Config(
        **{**SMALL, "max_position_embeddings": 256}, num_hidden_layers=2, pad_token_id=0,
        original_max_position_embeddings=64, partial_rotary_factor=0.75,
        rope_scaling={"type": "longrope", "short_factor": [1.0, 1.3, 1.7, 2.0, 3.0, 4.5],
                      "long_factor": [2.0, 3.0, 5.0, 7.0, 9.0, 11.0]}),
}
CLASSES = {"Gemma3TextConfig": transformers.Gemma3ForCausalLM, "Gemma2Config": transformers.Gemma2ForCausalLM,
           "Qwen3Config": transformers.Qwen3ForCausalLM, "LlamaConfig": transformers.LlamaForCausalLM,
           "Phi3Config": transformers.Phi3ForCausalLM}


def random_hf_model(config, seed=0):
    """transformers' model of `config` with every weight perturbed (so norms and biases are not all 1 or 0)."""
    torch.manual_seed(seed)
    config._attn_implementation = "eager"   # sdpa drops Gemma 2's attention soft-cap
    model = CLASSES[type(config).__name__](config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if "norm" in name else 0.02))
    return model.eval()


def _prompt(n=12, seed=0, vocab=300):
    return np.random.default_rng(seed).integers(3, vocab, n).tolist()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    model = random_hf_model(FAMILIES[request.param]())
    folder = tmp_path_factory.mktemp(request.param) / "hf"
    model.save_pretrained(folder, safe_serialization=True)
    return request.param, model, folder


def test_hf_family_fp32_matches_transformers(family, tmp_path):
    name, model, folder = family
    src = read_source(folder)
    max_context = 64 if "longrope" in name else None
    write_onnx(src, tmp_path, quant="fp32", progress=False, max_context=max_context)
    check_against_torch(tmp_path, model, _prompt(), steps=16, tol=TOL)


def test_sliding_layers_and_local_rope_in_the_graph(tmp_path):
    import onnx

    src = read_source(_saved(gemma3_config(), tmp_path / "hf"))
    write_onnx(src, tmp_path / "out", quant="fp32", progress=False)
    m = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False)
    gqa = [n for n in m.graph.node if n.op_type == "GroupQueryAttention"]
    windows = [next((a.i for a in n.attribute if a.name == "local_window_size"), -1) for n in gqa]
    assert windows == [8, -1, 8, 8]
    assert [n.input[7] for n in gqa] == ["cos_cache_local", "cos_cache", "cos_cache_local", "cos_cache_local"]
    assert sum(n.op_type == "HeadRMSNorm" for n in m.graph.node) == 8
    assert {f.name for f in m.functions} >= {"HeadRMSNorm", "Steer"}


def _saved(config, folder):
    random_hf_model(config).save_pretrained(folder, safe_serialization=True)
    return folder


# ---------------------------------------------------------------- GGUF, laid out as llama.cpp's converter does

def _write_gguf(path, arch, model, extra_meta=None):
    """Write a transformers model as llama.cpp's convert_hf_to_gguf lays out `arch` (f32, no vocabulary)."""
    import gguf

    c = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if arch != "phi3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    for key, value in (extra_meta or {}).items():
        getattr(w, key)(*value) if isinstance(value, tuple) else getattr(w, key)(value)
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm", "self_attn.qkv_proj": "attn_qkv", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    if arch == "gemma3":
        names.update({"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                      "post_feedforward_layernorm": "post_ffw_norm"})
    else:
        names["post_attention_layernorm"] = "ffn_norm"
    for name, t in sd.items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if arch == "gemma3" and name.endswith("norm.weight"):
            t = t + 1.0   # llama.cpp stores Gemma's norms as 1 + w
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            out = f"blk.{i}.{names[rest.rsplit('.', 1)[0]]}.weight"
            if arch == "llama" and rest.startswith(("self_attn.q_proj", "self_attn.k_proj")):
                from edgeact.converters.gguf_export import _to_interleaved   # llama.cpp's q/k row order

                t = _to_interleaved(t, c.num_attention_heads if "q_proj" in rest else c.num_key_value_heads)
        else:
            out = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                   "lm_head.weight": "output.weight"}[name]
        w.add_tensor(out, np.ascontiguousarray(t, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_gemma3_matches_transformers(tmp_path):
    # llama.cpp's fixed Gemma 3 settings: every 6th layer global, local rope base 1e4, scalar = head_dim
    cfg = gemma3_config(num_hidden_layers=6, layer_types=None, rope_local_base_freq=10000.0, query_pre_attn_scalar=32,
                        rope_theta=1e6)
    model = random_hf_model(cfg)
    path = _write_gguf(tmp_path / "g.gguf", "gemma3", model, {"add_sliding_window": cfg.sliding_window})
    src = read_source(path)
    assert src.config.layer_types == cfg.layer_types and src.config.tie_word_embeddings
    write_onnx(src, tmp_path / "out", quant="fp32", progress=False)
    check_against_torch(tmp_path / "out", model, _prompt(), steps=16, tol=TOL)


def test_gguf_qwen3_matches_transformers(tmp_path):
    model = random_hf_model(transformers.Qwen3Config(**SMALL, num_hidden_layers=2, head_dim=32, rope_theta=1e6,
                                                     tie_word_embeddings=False))
    src = read_source(_write_gguf(tmp_path / "q.gguf", "qwen3", model))
    assert src.config.qk_norm and src.config.arch == "qwen3"
    write_onnx(src, tmp_path / "out", quant="fp32", progress=False)
    check_against_torch(tmp_path / "out", model, _prompt(), steps=8, tol=TOL)


def test_gguf_phi3_longrope_matches_transformers(tmp_path):
    cfg = FAMILIES["phi3-longrope"]()
    model = random_hf_model(cfg)
    rs = cfg.rope_scaling
    path = tmp_path / "p.gguf"
    _write_gguf(path, "phi3", model, {"add_rope_dimension_count": 12,
                                      "add_rope_scaling_orig_ctx_len": cfg.original_max_position_embeddings})
    # llama.cpp writes the factors as tensors; add them with the gguf package's writer
    import gguf

    r = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(tmp_path / "p2.gguf"), "phi3")
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        w.add_key_value(f.name, f.contents(), f.types[0])
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data).reshape([int(d) for d in reversed(t.shape)]))
    w.add_tensor("rope_factors_long.weight", np.array(rs["long_factor"], np.float32))
    w.add_tensor("rope_factors_short.weight", np.array(rs["short_factor"], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    src = read_source(tmp_path / "p2.gguf")
    assert src.config.partial_rotary_factor == 0.75 and src.config.rope_scaling["rope_type"] == "longrope"
    write_onnx(src, tmp_path / "out", quant="fp32", progress=False, max_context=64)
    check_against_torch(tmp_path / "out", model, _prompt(), steps=8, tol=TOL)


# ---------------------------------------------------------------- bad input: named, never ignored

def _hf_config_folder(tmp_path, **cfg):
    import json

    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_unknown_architecture_lists_supported(tmp_path):
    folder = _hf_config_folder(tmp_path, architectures=["FalconForCausalLM"], model_type="falcon")
    with pytest.raises(ConversionError, match=r"FalconForCausalLM.* is not supported; supported: .*Gemma3ForCausalLM"):
        read_source(folder)


def test_unknown_gguf_architecture_lists_supported(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "falcon")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConversionError, match=r"architecture 'falcon' is not supported; supported via GGUF: "
                                              r"llama, qwen2, qwen3, phi3, gemma3"):
        read_source(tmp_path / "m.gguf")


BASE = dict(architectures=["LlamaForCausalLM"], vocab_size=300, hidden_size=64, intermediate_size=96,
            num_hidden_layers=2, num_attention_heads=4, tie_word_embeddings=True)


@pytest.mark.parametrize("fields,message", [
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "unsupported rope_scaling type 'dynamic'"),
    (dict(final_logit_softcapping=30.0), "final_logit_softcapping=30.0 on a llama model is not supported"),
    (dict(architectures=["Gemma3ForCausalLM"], hidden_activation="gelu"), "Gemma hidden activation 'gelu'"),
    (dict(architectures=["Gemma3ForCausalLM"], attn_logit_softcapping=50.0), "Gemma 3 attention has no soft-cap"),
    (dict(architectures=["Qwen3ForCausalLM"], use_sliding_window=True), "use_sliding_window=true on qwen3"),
    (dict(architectures=["Phi3ForCausalLM"], rope_scaling={"type": "longrope", "short_factor": [1.0] * 8,
                                                          "long_factor": [1.0] * 8},
          original_max_position_embeddings=32, max_position_embeddings=64), "exceeds the original context 32"),
])
def test_unhandled_config_fields_are_refused(tmp_path, fields, message):
    from safetensors.numpy import save_file

    folder = _hf_config_folder(tmp_path, **{**BASE, **fields})
    save_file({"model.embed_tokens.weight": np.zeros((300, 64), np.float32)}, str(folder / "model.safetensors"))
    with pytest.raises(ConversionError, match=message):
        src = read_source(folder)
        write_onnx(src, tmp_path / "out", quant="fp32", progress=False)


# ---------------------------------------------------------------- the tied embedding stored once

@pytest.mark.parametrize("lm_head,hidden", [("int4", 48), ("int8", 64), ("int4", 64)])
def test_tied_table_stored_once(tmp_path, lm_head, hidden):
    """One quantized table: GatherBlockQuantized looks rows up in lm_head's MatMulNBits initializers; the
    logits equal transformers' with that dequantized table as both embedding and lm_head."""
    import onnx

    from edgeact.converters.model import SourceModel
    from edgeact.converters.quantize import dequantize, quantize_blockwise
    from edgeact.converters.random_model import random_source
    from edgeact.converters.torch_ref import build_torch_model

    # hidden 48: rows padded to the block of 32 come back sliced
    src = random_source("tiny", seed=4, tie_word_embeddings=True, hidden_size=hidden)
    write_onnx(src, tmp_path, quant="fp32", lm_head=lm_head, embedding="shared", accuracy_level=1, progress=False)
    m = onnx.load(str(tmp_path / "model.onnx"))
    vocab = src.config.vocab_size
    tables = [i.name for i in m.graph.initializer if i.dims and i.dims[0] == vocab]
    assert sorted(tables) == sorted(n for n in ("lm_head.weight.B", "lm_head.weight.scales", "lm_head.weight.zero_points")
                                    if n in tables) and "lm_head.weight.B" in tables
    assert not any(i.name.startswith("model.embed_tokens") for i in m.graph.initializer)
    nodes = {n.name: n for n in m.graph.node}
    gbq, head = nodes["embed"], nodes["lm_head"]
    assert gbq.op_type == "GatherBlockQuantized" and head.op_type == "MatMulNBits"
    producer = {o: n for n in m.graph.node for o in n.output}

    def stored(value):   # the initializer behind a value, through Reshape views and Casts
        while value in producer and producer[value].op_type in ("Reshape", "Cast"):
            value = producer[value].input[0]
        return value
    assert [stored(v) for v in gbq.input[:1] + gbq.input[2:]] == [stored(v) for v in head.input[1:]]

    qw = quantize_blockwise(src.load("model.embed_tokens.weight"), 4 if lm_head == "int4" else 8, 32, False)
    table = dequantize(qw)
    ref = SourceModel(config=src.config, tensors={**src.tensors, "model.embed_tokens.weight": lambda: table})
    check_against_torch(tmp_path, build_torch_model(ref), _prompt(vocab=vocab), steps=8, tol=TOL)


def _tables(folder) -> list[str]:
    """The initializers with a row per vocabulary entry."""
    import onnx

    m = onnx.load(str(folder / "model.onnx"))
    vocab = json.loads((folder / "edgeact.json").read_text())["config"]["vocab_size"]
    return sorted(i.name for i in m.graph.initializer if i.dims and i.dims[0] == vocab)


@pytest.mark.parametrize("quant", ["int4", "int8", "source"])
def test_default_convert_stores_the_tied_table_once(tmp_path, quant):
    """The default for a tied model with a quantized lm_head is one table: the lookup reads lm_head's
    blocks (the same initializers), and the native runtime equals onnxruntime on it. --embedding fp16 keeps
    a float table of its own; an untied model keeps its fp16 table."""
    import edgeact
    from edgeact.converters.convert import convert
    from edgeact.converters.random_model import random_source
    from edgeact.evaluate import compare_logits

    src = random_source("tiny", seed=4, tie_word_embeddings=True)
    out = convert(src, tmp_path / "default", quant=quant, progress=False)
    meta = json.loads((out / "edgeact.json").read_text())["quantization"]
    assert meta["embedding"] == "shared" and meta["lm_head"] == "int8"
    assert _tables(out) == ["lm_head.weight.B", "lm_head.weight.zero_points"]   # (scales are 1-D)
    ids = [1, 7, 42, 5, 99, 3, 250, 17]
    q = compare_logits(edgeact.load(out, engine="native").forward(ids), edgeact.load(out, engine="ort").forward(ids),
                       ids)
    assert q.kl < 1e-3 and q.top1 >= 0.99, q
    two = convert(src, tmp_path / "fp16", quant=quant, embedding="fp16", progress=False)
    assert json.loads((two / "edgeact.json").read_text())["quantization"]["embedding"] == "fp16"
    assert "model.embed_tokens.weight" in _tables(two) and "lm_head.weight.B" in _tables(two)
    untied = convert(random_source("tiny", seed=4), tmp_path / "untied", quant=quant, progress=False)
    assert json.loads((untied / "edgeact.json").read_text())["quantization"]["embedding"] == "fp16"


def test_shared_table_needs_a_tied_quantized_head(tmp_path):
    from edgeact.converters.random_model import random_source

    with pytest.raises(ConversionError, match="needs a tied model"):
        write_onnx(random_source("tiny"), tmp_path, quant="int4", embedding="shared", progress=False)
    with pytest.raises(ConversionError, match="needs a tied model"):
        write_onnx(random_source("tiny", tie_word_embeddings=True), tmp_path, quant="fp32", embedding="shared",
                   progress=False)


@pytest.mark.parametrize("arch", ["gemma3", "qwen3"])
def test_gguf_export_round_trip(tmp_path, arch):
    """The llama.cpp baseline's GGUF (converters/gguf_export.py) reads back as the same model."""
    from edgeact.converters.gguf_export import write_gguf
    from edgeact.converters.random_model import random_source

    src = random_source(f"{arch}-tiny", seed=2)
    back = read_source(write_gguf(src, tmp_path / "m.gguf", dtype="f32"))
    for field in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "qk_norm", "sandwich_norms",
                  "layer_types", "sliding_window", "norm_offset", "attention_scale", "rope_local_theta"):
        assert getattr(back.config, field) == getattr(src.config, field), field
    for name in src.tensors:
        np.testing.assert_allclose(back.load(name), src.load(name), atol=1e-6, err_msg=name)


@pytest.mark.parametrize("shape", ["gemma3-tiny", "qwen3-tiny"])
def test_random_family_shapes_match_transformers(tmp_path, shape):
    """The random shapes `edgeact bench` builds for the families run through torch_ref's transformers model."""
    from edgeact.converters.random_model import random_source
    from edgeact.converters.torch_ref import build_torch_model

    src = random_source(shape, seed=1)
    write_onnx(src, tmp_path, quant="fp32", progress=False)
    check_against_torch(tmp_path, build_torch_model(src), _prompt(), steps=8, tol=TOL)


def test_awq_folds_into_gemma_norms(tmp_path):
    """AWQ's scales fold into Gemma's (1 + w) norms and its pre-FFN norm: the fp32 function is unchanged."""
    from edgeact.converters.awq import awq_transform
    from edgeact.converters.random_model import random_source
    from test_writer import OrtDecoder

    src = random_source("gemma3-tiny", seed=1)
    new, _ = awq_transform(src, group_size=32, calib_tokens=128, clip=False, progress=False)
    write_onnx(src, tmp_path / "a", quant="fp32", progress=False)
    write_onnx(new, tmp_path / "b", quant="fp32", progress=False)
    ids = _prompt()
    la = OrtDecoder(tmp_path / "a" / "model.onnx").step(ids)["logits"]
    lb = OrtDecoder(tmp_path / "b" / "model.onnx").step(ids)["logits"]
    assert np.abs(la - lb).max() <= 1e-3


def test_gemma3_gguf_stop_tokens_and_tokenizer(tmp_path):
    """A Gemma GGUF's <end_of_turn> joins its stop tokens; its vocabulary becomes a BPE tokenizer.json that
    equals sentencepiece on the same pieces (whole pieces by score, whitespace runs, byte fallback)."""
    import sentencepiece
    from tokenizers import Tokenizer

    from edgeact.converters.readers.tokenizer_convert import gguf_sentencepiece_proto

    cfg = gemma3_config(num_hidden_layers=6, layer_types=None, rope_local_base_freq=10000.0, query_pre_attn_scalar=32)
    model = random_hf_model(cfg)
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\n", "  ", "   "]
    types = [3, 3, 3, 2, 3, 3, 4, 4, 4]
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    words = ["▁", "a", "b", "c", "h", "e", "l", "o", "▁h", "he", "ll", "lo", "▁he", "▁hel", "llo", "▁hello", "ab",
             "▁ab", "abc", "▁abc"]
    pieces += words
    types += [1] * len(words)
    pieces += [f"<unused{i}>" for i in range(cfg.vocab_size - len(pieces))]
    types += [3] * (cfg.vocab_size - len(types))
    scores = [0.0] * 265 + [-float(i) for i in range(len(words))] + [0.0] * (cfg.vocab_size - 265 - len(words))
    path = _write_gguf(tmp_path / "g.gguf", "gemma3", model, {
        "add_sliding_window": cfg.sliding_window, "add_tokenizer_model": "llama", "add_token_list": (pieces,),
        "add_token_scores": (scores,), "add_token_types": (types,), "add_bos_token_id": 2, "add_eos_token_id": 1,
        "add_unk_token_id": 3, "add_pad_token_id": 0, "add_add_bos_token": True, "add_add_space_prefix": False})
    src = read_source(path)
    assert src.config.eos_token_ids == [1, 5] and src.add_bos_token and src.chat_template is None
    tok = Tokenizer.from_str(src.tokenizer_json)
    (tmp_path / "t.model").write_bytes(gguf_sentencepiece_proto(path, escape_space_pieces=True))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "t.model"))
    for text in ["hello abc", "  hello   abc\n", "héllo 🙂", "abcabc hello", ""]:
        assert tok.encode(text).ids == [2] + sp.encode(text), text
    # turn markers are matched as special tokens in text (chat templates write them)
    assert tok.encode("<start_of_turn>hello<end_of_turn>").ids == [2, 4] + tok.encode("hello").ids[1:] + [5]


def test_gguf_llama3_rope_freqs(tmp_path):
    """llama.cpp keeps Llama 3's rope scaling only as rope_freqs divisors: read back as the llama3 rope type."""
    import gguf

    cfg = transformers.LlamaConfig(**{**SMALL, "max_position_embeddings": 256}, num_hidden_layers=2, rope_theta=5e5,
                                   rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    model = random_hf_model(cfg)
    path = _write_gguf(tmp_path / "l.gguf", "llama", model)
    # llama.cpp's convert_hf_to_gguf: factor where the wavelength exceeds 8192, 1 below 2048, smooth between
    head = cfg.hidden_size // cfg.num_attention_heads
    freqs = 1.0 / 5e5 ** (np.arange(0, head, 2) / head)
    factors = []
    for f in freqs:
        wl = 2 * np.pi / f
        smooth = (8192 / wl - 1.0) / (4.0 - 1.0)
        factors.append(1.0 if wl < 2048 else 32.0 if wl > 8192 else 1 / ((1 - smooth) / 32.0 + smooth))
    r = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(tmp_path / "l2.gguf"), "llama")
    for f in r.fields.values():
        if not f.name.startswith("GGUF.") and f.name != "general.architecture":
            w.add_key_value(f.name, f.contents(), f.types[0])
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data).reshape([int(d) for d in reversed(t.shape)]))
    w.add_tensor("rope_freqs.weight", np.array(factors, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    src = read_source(tmp_path / "l2.gguf")
    assert src.config.rope_scaling["rope_type"] == "llama3" and src.config.rope_scaling["factor"] == 32.0
    write_onnx(src, tmp_path / "out", quant="fp32", progress=False)
    check_against_torch(tmp_path / "out", model, _prompt(), steps=8, tol=TOL)
