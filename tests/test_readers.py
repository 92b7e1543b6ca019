"""Source readers against independent references: transformers' GGUF loader, transformers
models saved as HF folders, and a numpy implementation of llama2.c's forward pass."""
from __future__ import annotations

import shutil
import struct
import warnings

import numpy as np
import pytest
import torch
import transformers

from edgeact.converters.model import ConversionError
from edgeact.converters.readers import read_source
from edgeact.converters.torch_ref import build_torch_model

LOGIT_TOL = 1e-4


def _logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


# ---------------------------------------------------------------- llama2.c

def _llama2c_dims(d):
    head = d["dim"] // d["n_heads"]
    return head, d["n_heads"] * head, d["n_kv_heads"] * head


def write_llama2c(path, d, w, version=0):
    """Write weights `w` (llama2.c names, interleaved rotary) the way llama2.c's export.py does."""
    L, dim, hid = d["n_layers"], d["dim"], d["hidden_dim"]
    head, _, _ = _llama2c_dims(d)
    shared = "wcls" not in w
    dims = (dim, hid, L, d["n_heads"], d["n_kv_heads"], d["vocab_size"], d["seq_len"])
    with open(path, "wb") as f:
        if version == 0:
            f.write(struct.pack("<7i", *dims[:5], dims[5] if shared else -dims[5], dims[6]))
            freqs = np.zeros((d["seq_len"], head // 2), np.float32)
            parts = [w["tok"], w["rms_att"], w["wq"], w["wk"], w["wv"], w["wo"], w["rms_ffn"],
                     w["w1"], w["w2"], w["w3"], w["rms_final"], freqs, freqs]
        else:
            header = struct.pack("<Ii7iB", 0x616B3432, 1, *dims, int(shared))
            f.write(header + b"\0" * (256 - len(header)))
            parts = [w["rms_att"], w["rms_ffn"], w["rms_final"], w["tok"], w["wq"], w["wk"], w["wv"],
                     w["wo"], w["w1"], w["w2"], w["w3"]]
        if not shared:
            parts.append(w["wcls"])
        for p in parts:
            f.write(np.ascontiguousarray(p, dtype="<f4").tobytes())


def parse_legacy_llama2c(path):
    """Header and weights of a legacy llama2.c file, read straight from disk (no reader code)."""
    raw = open(path, "rb").read()
    keys = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
    d = dict(zip(keys, struct.unpack_from("<7i", raw, 0)))
    shared = d["vocab_size"] > 0
    d["vocab_size"] = abs(d["vocab_size"])
    L, dim, hid, V = d["n_layers"], d["dim"], d["hidden_dim"], d["vocab_size"]
    head, q, kv = _llama2c_dims(d)
    shapes = [("tok", (V, dim)), ("rms_att", (L, dim)), ("wq", (L, q, dim)), ("wk", (L, kv, dim)),
              ("wv", (L, kv, dim)), ("wo", (L, dim, q)), ("rms_ffn", (L, dim)), ("w1", (L, hid, dim)),
              ("w2", (L, dim, hid)), ("w3", (L, hid, dim)), ("rms_final", (dim,)),
              ("fr", (d["seq_len"], head // 2)), ("fi", (d["seq_len"], head // 2))]
    if not shared:
        shapes.append(("wcls", (V, dim)))
    flat = np.frombuffer(raw, dtype="<f4", offset=28)
    w, off = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        w[name] = flat[off:off + n].reshape(shape).astype(np.float64)
        off += n
    assert off == flat.size
    return d, w


def llama2c_forward(d, w, tokens):
    """llama2.c's run.c forward pass over a whole sequence, in float64 numpy (interleaved rotary)."""
    head, _, _ = _llama2c_dims(d)
    H, KV, T = d["n_heads"], d["n_kv_heads"], len(tokens)

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * g

    def rope(x):  # x [T, heads, head]; pairs (2i, 2i+1) rotate by pos * 10000^(-2i/head)
        freq = 1.0 / 10000.0 ** (np.arange(0, head, 2) / head)
        ang = np.arange(T)[:, None] * freq[None, :]
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = x0 * c - x1 * s, x0 * s + x1 * c
        return out

    x = w["tok"][tokens].astype(np.float64)
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for layer in range(d["n_layers"]):
        h = rms(x, w["rms_att"][layer])
        q = rope((h @ w["wq"][layer].T).reshape(T, H, head))
        k = rope((h @ w["wk"][layer].T).reshape(T, KV, head))
        v = (h @ w["wv"][layer].T).reshape(T, KV, head)
        k, v = np.repeat(k, H // KV, axis=1), np.repeat(v, H // KV, axis=1)
        att = np.einsum("thd,shd->hts", q, k) / np.sqrt(head) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", att, v).reshape(T, -1) @ w["wo"][layer].T
        h = rms(x, w["rms_ffn"][layer])
        g = h @ w["w1"][layer].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ w["w3"][layer].T)) @ w["w2"][layer].T
    return rms(x, w["rms_final"]) @ w.get("wcls", w["tok"]).T


def test_stories260k_matches_numpy_llama2c(stories260k):
    d, w = parse_legacy_llama2c(stories260k)
    with pytest.warns(UserWarning, match="tokenizer"):
        src = read_source(stories260k)
    assert src.tokenizer_json is None
    cfg = src.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
            cfg.vocab_size, cfg.max_position_embeddings) == (64, 172, 5, 8, 4, 512, 512)
    assert cfg.tie_word_embeddings and src.add_bos_token and cfg.bos_token_id == 1
    tokens = [1] + list(np.random.default_rng(0).integers(3, 512, 31))
    ours = _logits(build_torch_model(src), tokens)
    ref = llama2c_forward(d, w, tokens)
    assert np.abs(ours - ref).max() <= LOGIT_TOL


def _random_llama2c(rng, d, shared):
    L, dim, hid, V = d["n_layers"], d["dim"], d["hidden_dim"], d["vocab_size"]
    _, q, kv = _llama2c_dims(d)
    r = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)  # noqa: E731
    w = {"tok": r(V, dim), "rms_att": 1 + r(L, dim), "wq": r(L, q, dim), "wk": r(L, kv, dim),
         "wv": r(L, kv, dim), "wo": r(L, dim, q), "rms_ffn": 1 + r(L, dim), "w1": r(L, hid, dim),
         "w2": r(L, dim, hid), "w3": r(L, hid, dim), "rms_final": 1 + r(dim)}
    if not shared:
        w["wcls"] = r(V, dim)
    return w


@pytest.mark.parametrize("version,shared", [(0, False), (1, False), (1, True)])
def test_synthetic_llama2c_gqa(tmp_path, version, shared):
    d = dict(dim=48, hidden_dim=80, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=97, seq_len=64)
    w = _random_llama2c(np.random.default_rng(version), d, shared)
    path = tmp_path / "model.bin"
    write_llama2c(path, d, w, version)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = read_source(path)
    assert src.config.tie_word_embeddings == shared and src.has("lm_head.weight") == (not shared)
    assert src.config.num_kv_heads == 2 and src.config.max_position_embeddings == 64
    np.testing.assert_array_equal(src.load("model.layers.1.mlp.down_proj.weight"), w["w2"][1])
    tokens = list(np.random.default_rng(1).integers(0, 97, 20))
    ref = llama2c_forward(d, {k: v.astype(np.float64) for k, v in w.items()}, tokens)
    assert np.abs(_logits(build_torch_model(src), tokens) - ref).max() <= LOGIT_TOL


def test_llama2c_truncated(tmp_path, stories260k):
    path = tmp_path / "cut.bin"
    path.write_bytes(stories260k.read_bytes()[:-1000])
    with pytest.raises(ConversionError, match=r"implies 1056540 bytes but the file has 1055540"):
        read_source(path)


def test_llama2c_tokenizer_vocab_mismatch(stories260k, llama2_tokenizer_dir):
    with pytest.raises(ConversionError, match="32000 tokens but the checkpoint's vocab_size is 512"):
        read_source(stories260k, tokenizer=llama2_tokenizer_dir / "tokenizer.bin")


def test_llama2c_tokenizer_beside_checkpoint(tmp_path, llama2_tokenizer_dir):
    d = dict(dim=16, hidden_dim=24, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=32000, seq_len=16)
    write_llama2c(tmp_path / "m.bin", d, _random_llama2c(np.random.default_rng(0), d, True))
    shutil.copy(llama2_tokenizer_dir / "tokenizer.bin", tmp_path / "tokenizer.bin")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(read_source(tmp_path / "m.bin").tokenizer_json)
    assert tok.encode("Hello").ids[0] == 1 and tok.token_to_id("</s>") == 2


# ---------------------------------------------------------------- dispatch and bad input

def test_dispatch_errors(tmp_path):
    with pytest.raises(ConversionError, match="does not exist"):
        read_source(tmp_path / "nope.gguf")
    (tmp_path / "x.onnx").write_bytes(b"\0" * 64)
    with pytest.raises(ConversionError, match="cannot tell the format"):
        read_source(tmp_path / "x.onnx")
    with pytest.raises(ConversionError, match="without config.json"):
        read_source(tmp_path)
    with pytest.raises(ConversionError, match="only used with llama2.c"):
        read_source(tmp_path / "x.onnx", tokenizer=tmp_path / "tokenizer.bin")
    (tmp_path / "tiny.bin").write_bytes(b"\1\0")
    with pytest.raises(ConversionError, match="too short"):
        read_source(tmp_path / "tiny.bin")


def test_unsupported_hf_architecture(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    with pytest.raises(ConversionError, match="not supported; supported: LlamaForCausalLM, MistralForCausalLM, "
                                              "Qwen2ForCausalLM"):
        read_source(tmp_path)


# ---------------------------------------------------------------- GGUF

def _llamacpp_permute(w, n_heads):
    """llama.cpp convert_hf_to_gguf's permute (HF rotate_half rows → interleaved)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, model, arch="llama"):
    import gguf

    c = model.config
    wr = gguf.GGUFWriter(str(path), arch)
    wr.add_block_count(c.num_hidden_layers)
    wr.add_context_length(c.max_position_embeddings)
    wr.add_embedding_length(c.hidden_size)
    wr.add_feed_forward_length(c.intermediate_size)
    wr.add_head_count(c.num_attention_heads)
    wr.add_head_count_kv(c.num_key_value_heads)
    wr.add_layer_norm_rms_eps(c.rms_norm_eps)
    wr.add_rope_freq_base(c.rope_theta)
    wr.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    wr.add_rope_scaling_factor(2.0)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for name, t in model.state_dict().items():
        a = t.numpy().astype(np.float32)
        if name.startswith("model.layers."):
            i, rest = name.split(".", 3)[2:]
            mod = rest.rsplit(".", 1)[0]
            if mod == "self_attn.q_proj":
                a = _llamacpp_permute(a, c.num_attention_heads)
            if mod == "self_attn.k_proj":
                a = _llamacpp_permute(a, c.num_key_value_heads)
            wr.add_tensor(f"blk.{i}.{per_layer[mod]}.weight", a)
        else:
            wr.add_tensor(names[name], a)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


def _tiny_llama(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=5e4)
    cfg.update(kw)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()


def test_synthetic_gguf_undoes_llamacpp_permutation(tmp_path):
    model = _tiny_llama(rope_scaling={"rope_type": "linear", "factor": 2.0})
    _write_gguf(tmp_path / "m.gguf", model)
    src = read_source(tmp_path / "m.gguf")
    assert src.config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert not src.config.tie_word_embeddings and src.tokenizer_json is None
    for name, t in model.state_dict().items():
        np.testing.assert_array_equal(src.load(name), t.numpy(), err_msg=name)
    ids = list(range(5, 37))
    assert np.abs(_logits(build_torch_model(src), ids) - _logits(model, ids)).max() <= LOGIT_TOL


def test_gguf_other_architecture_rejected(tmp_path):
    _write_gguf(tmp_path / "m.gguf", _tiny_llama(), arch="gpt2")
    with pytest.raises(ConversionError, match="'gpt2' is not supported; supported via GGUF: llama, qwen2, qwen3"):
        read_source(tmp_path / "m.gguf")


def test_gguf_truncated(tmp_path, smollm2_gguf):
    path = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as f:
        path.write_bytes(f.read(1 << 20))
    with pytest.raises(ConversionError, match="GGUF"):
        read_source(path)


def test_smollm2_metadata(smollm2_source):
    src, cfg = smollm2_source, smollm2_source.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.intermediate_size, cfg.vocab_size) == (30, 576, 9, 3, 64, 1536, 49152)
    assert cfg.rope_theta == 100000.0 and cfg.tie_word_embeddings and not src.has("lm_head.weight")
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (1, [2]) and src.add_bos_token is False
    assert "<|im_start|>" in src.chat_template
    assert src.provenance["format"] == "gguf"
    assert src.provenance["dtypes"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}


def test_smollm2_tensors_and_logits_match_transformers(smollm2_source, smollm2_hf):
    ref_state = smollm2_hf.state_dict()
    for name, t in ref_state.items():
        if name == "lm_head.weight":
            continue
        np.testing.assert_array_equal(smollm2_source.load(name), t.numpy(), err_msg=name)
    ids = [1] + list(np.random.default_rng(0).integers(3, 49152, 31))
    ours = _logits(build_torch_model(smollm2_source), ids)
    assert np.abs(ours - _logits(smollm2_hf, ids)).max() <= LOGIT_TOL


def test_smollm2_tokenizer_matches_transformers(smollm2_source, smollm2_gguf):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    ours = Tokenizer.from_str(smollm2_source.tokenizer_json)
    chats = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2 = ?  Ünïcödé 🙂\n\ttabs"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
         {"role": "user", "content": "  leading and trailing spaces  "}],
    ]
    for chat in chats:
        text = ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ids = ours.encode(text).ids
        # GGUF says add_bos_token=false; transformers' Llama wrapper would add <|im_start|>, so compare without.
        assert ids == ref.encode(text, add_special_tokens=False)
        assert ours.decode(ids, skip_special_tokens=False) == text


# ---------------------------------------------------------------- Hugging Face folders

def _check_hf_folder(model, folder, expect_names, dtype_name):
    src = read_source(folder)
    assert set(src.tensors) == expect_names
    for name in expect_names:
        np.testing.assert_array_equal(src.load(name), model.state_dict()[name].float().numpy(), err_msg=name)
    assert list(src.provenance["dtypes"]) == [dtype_name]
    ids = list(range(3, 35))
    ref = _logits(model.float(), ids)
    assert np.abs(_logits(build_torch_model(src), ids) - ref).max() <= LOGIT_TOL
    return src


def test_hf_llama_untied_gqa_single_file(tmp_path):
    model = _tiny_llama(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    model.save_pretrained(tmp_path, safe_serialization=True)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0"}')
    (tmp_path / "tokenizer_config.json").write_text('{"add_bos_token": false, "chat_template": "{{ x }}"}')
    src = _check_hf_folder(model, tmp_path, set(model.state_dict()), "F32")
    assert src.config.num_kv_heads == 2 and src.config.rope_scaling["rope_type"] == "llama3"
    assert src.tokenizer_json == '{"version": "1.0"}' and src.chat_template == "{{ x }}"
    assert src.add_bos_token is False


def test_hf_qwen2_tied_bias_sharded_bf16(tmp_path):
    torch.manual_seed(1)
    cfg = transformers.Qwen2Config(vocab_size=150, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.Qwen2ForCausalLM(cfg).eval().to(torch.bfloat16)
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    names = set(model.state_dict()) - {"lm_head.weight"}
    src = _check_hf_folder(model, tmp_path, names, "BF16")
    assert src.config.attention_bias and src.config.tie_word_embeddings and src.config.arch == "qwen2"


def test_hf_mistral_fp16(tmp_path):
    torch.manual_seed(2)
    cfg = transformers.MistralConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                     sliding_window=None, rope_theta=1e6)
    model = transformers.MistralForCausalLM(cfg).eval().to(torch.float16)
    model.save_pretrained(tmp_path, safe_serialization=True)
    src = _check_hf_folder(model, tmp_path, set(model.state_dict()), "F16")
    assert src.config.head_dim == 32 and src.config.rope_theta == 1e6 and src.config.arch == "mistral"


def test_hf_missing_shard(tmp_path):
    model = _tiny_llama()
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-0*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ConversionError, match="missing shard"):
        read_source(tmp_path)
