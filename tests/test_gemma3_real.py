"""The real Gemma 3 270M (pretrained, no chat template) against transformers and sentencepiece.

transformers loads the GGUF dequantized (minutes on 2 cores): its logits are computed once
per session. Skipped when the model's packages are not installed.
"""
from __future__ import annotations

import numpy as np
import pytest

from edgeact.converters.convert import convert
from test_writer import OrtDecoder

TEXT = "The capital of France is Paris. The capital of Germany is"
FP32_TOL = 2e-3   # max |Δlogit| over logits of magnitude ~30 after 18 layers, fp32 both sides


@pytest.fixture(scope="module")
def reference(gemma3_gguf, gemma3_source):
    """transformers' dequantized Gemma3ForCausalLM: (ids, logits of TEXT, its greedy continuation)."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    ids = Tokenizer.from_str(gemma3_source.tokenizer_json).encode(TEXT).ids
    model = AutoModelForCausalLM.from_pretrained(str(gemma3_gguf.parent), gguf_file=gemma3_gguf.name,
                                                 torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    del model
    return ids, logits, greedy


def test_gemma3_config(gemma3_source):
    c = gemma3_source.config
    assert (c.arch, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == \
        ("gemma3", 18, 640, 4, 1, 256, 262144)
    assert c.sliding_window == 512 and c.rope_theta == 1e6 and c.rope_local_theta == 1e4
    assert c.layer_types.count("full_attention") == 3 and c.layer_types[5] == "full_attention"
    assert c.tie_word_embeddings and c.qk_norm and c.sandwich_norms and c.hidden_act == "gelu_tanh"
    assert 106 in c.eos_token_ids and 1 in c.eos_token_ids   # <end_of_turn>, <eos>
    assert gemma3_source.chat_template is None and gemma3_source.add_bos_token


TEXTS = ["Hello world, how are you?", "  multiple   spaces\n\n\ttabs\r\n", "Grüße aus München! 日本語のテキスト。 Привет мир",
         "def f(x):\n    return x**2  # 🙂🚀 naïve café", "١٢٣ and 12345678901234567890", "ℌ𝔢𝔩𝔩𝔬 — “quotes” ‘and’ …",
         "", " leading space", "trailing space ", "<b>html</b> &amp; URLs https://example.com/a?b=c"]


def test_gemma3_tokenizer_equals_sentencepiece(gemma3_gguf, gemma3_source, tmp_path):
    """Our tokenizer.json against sentencepiece itself on the vocabulary's BPE model (pieces, scores, types)."""
    import sentencepiece
    from tokenizers import Tokenizer

    from edgeact.converters.readers.tokenizer_convert import gguf_sentencepiece_proto

    model = tmp_path / "tokenizer.model"
    model.write_bytes(gguf_sentencepiece_proto(gemma3_gguf, escape_space_pieces=True))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    tok = Tokenizer.from_str(gemma3_source.tokenizer_json)
    for text in TEXTS:
        assert tok.encode(text).ids == [2] + sp.encode(text), text
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=True) == text
    assert tok.encode("Hello world").ids == [2, 9259, 1902]   # whole words, as Gemma's own tokenizer
    # turn markers are special tokens in the text (sentencepiece leaves control pieces to the caller)
    assert tok.encode("<start_of_turn>user\nhi<end_of_turn>").ids == [2, 105, 2364, 107, 2202, 106]


def test_gemma3_fp32_logits_match_transformers(gemma3_gguf, reference, tmp_path_factory):
    ids, ref, _ = reference
    out = tmp_path_factory.mktemp("g3") / "fp32"
    convert(gemma3_gguf, out, quant="fp32", progress=False)
    logits = OrtDecoder(out / "model.onnx").step(ids)["logits"][0]
    err = float(np.abs(logits - ref).max())
    assert err <= FP32_TOL, f"max |Δlogit| {err}"
    assert (logits.argmax(-1) == ref.argmax(-1)).all()


@pytest.fixture(scope="module")
def gemma3_int4_dir(gemma3_gguf, tmp_path_factory):
    """int4 layers and the int4 table stored once (lookup and lm_head): the folder under the GGUF's size."""
    out = tmp_path_factory.mktemp("g3") / "int4"
    return convert(gemma3_gguf, out, quant="int4", lm_head="int4", embedding="shared", progress=False)


def test_gemma3_int4_greedy_text(gemma3_source, reference, gemma3_int4_dir):
    """The greedy continuation names Berlin, as transformers' does, and the folder is at most the GGUF's size."""
    from tokenizers import Tokenizer

    ids, _, ref_greedy = reference
    tokens, _ = OrtDecoder(gemma3_int4_dir / "model.onnx").greedy(ids, 8)
    tok = Tokenizer.from_str(gemma3_source.tokenizer_json)
    assert "Berlin" in tok.decode(ref_greedy)
    assert "Berlin" in tok.decode(tokens), tok.decode(tokens)
    size = sum(f.stat().st_size for f in gemma3_int4_dir.iterdir())
    assert size <= 253_113_024, f"{size} bytes: larger than the GGUF it came from"


def test_gemma3_int4_native_matches_onnxruntime(gemma3_int4_dir):
    """The native runtime against onnxruntime on the real model, at test_native_engine's bound for real models
    at accuracy_level 4 (the spec bound, or 1.5x onnxruntime's own prefill/decode disagreement)."""
    runtime = pytest.importorskip("edgeact.runtime")
    if not runtime.available():
        pytest.skip(runtime.unavailable_reason())
    from pathlib import Path

    from tokenizers import Tokenizer

    from test_native_engine import _assert_agreement, _quant_agreement

    docs = Path(__file__).resolve().parents[1] / "docs" / "steering"
    text = " ".join((docs / f).read_text(encoding="utf-8") for f in ("heldout.txt", "cheerful.txt", "gloomy.txt"))
    ids = np.array(Tokenizer.from_file(str(gemma3_int4_dir / "tokenizer.json")).encode(text).ids[:256], np.int64)
    _assert_agreement(*_quant_agreement(gemma3_int4_dir, ids))
