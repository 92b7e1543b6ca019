"""The SDK over the onnxruntime engine: logits against torch, the KV cache,
generation semantics, chat template, streaming, and the errors users see."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import edgeact
from edgeact.converters.convert import convert
from edgeact.converters.random_model import random_source
from edgeact.converters.torch_ref import build_torch_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    src = random_source("tiny", seed=7)
    out = convert(src, tmp_path_factory.mktemp("sdk") / "tiny-fp32", quant="fp32", progress=False)
    return src, out


def _torch_logits(src, ids):
    with torch.no_grad():
        return build_torch_model(src)(torch.tensor([list(ids)])).logits[0].numpy()


def test_forward_matches_torch_and_is_fresh(tiny):
    src, folder = tiny
    m = edgeact.load(folder, engine="ort")
    ids = [1, 5, 7, 9, 11, 200, 3, 4]
    ref = _torch_logits(src, ids)
    got = m.forward(ids)
    assert got.shape == (len(ids), 300)
    assert np.abs(got - ref).max() <= 1e-3
    # forward starts a fresh sequence each call: same result twice
    assert np.array_equal(m.forward(ids), got)


def test_engine_cache_across_calls(tiny):
    src, folder = tiny
    eng = edgeact.load(folder, engine="ort").engine
    ids = np.array([1, 5, 7, 9, 11, 200, 3, 4])
    eng.reset()
    parts = [eng.forward(ids[:5]), eng.forward(ids[5:6]), eng.forward(ids[6:])]
    assert eng.n_past == len(ids)
    assert np.abs(np.concatenate(parts) - _torch_logits(src, ids)).max() <= 1e-3


def test_greedy_through_cache_equals_recompute(tiny):
    _, folder = tiny
    m = edgeact.load(folder, engine="ort")
    prompt = [1, 17, 42]
    res = m.generate(prompt, max_new_tokens=12)
    seq = list(prompt)
    for _ in range(12):
        seq.append(int(m.forward(seq)[-1].argmax()))
    # an empty or cut-short generation must not pass: 12 tokens, or fewer ending at an end-of-sequence id
    assert len(res.ids) >= 1 and res.ids == seq[len(prompt):][: len(res.ids)]
    if res.finish_reason == "length":
        assert len(res.ids) == 12
    else:
        assert res.finish_reason == "eos" and res.ids[-1] in m.eos_token_ids


def test_sampling_reproducible_with_seed(tiny):
    _, folder = tiny
    m = edgeact.load(folder, engine="ort")
    a = m.generate([1, 2], max_new_tokens=10, temperature=1.0, seed=3).ids
    b = m.generate([1, 2], max_new_tokens=10, temperature=1.0, seed=3).ids
    c = m.generate([1, 2], max_new_tokens=10, temperature=1.0, seed=4).ids
    assert a == b and a != c


def test_errors(tiny, tmp_path):
    _, folder = tiny
    m = edgeact.load(folder, engine="ort")
    with pytest.raises(ValueError, match="out of range"):
        m.forward([1, 300])
    with pytest.raises(ValueError, match="no tokenizer"):
        m.generate("hello")
    with pytest.raises(ValueError, match="context overflow"):
        m.forward(np.ones(m.engine.max_context + 1, dtype=np.int64))
    with pytest.raises(ValueError, match="not found"):
        edgeact.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown engine"):
        edgeact.load(folder, engine="gpu")
    with pytest.raises(ValueError, match="top_p"):
        m.generate([1], top_p=0.0)


def test_hidden_states_are_steer_outputs(tiny):
    src, folder = tiny
    eng = edgeact.load(folder, engine="ort").engine
    ids = [1, 5, 7, 9]
    eng.reset()
    logits, hidden = eng.forward(np.array(ids), output_hidden=True)
    with torch.no_grad():
        out = build_torch_model(src)(torch.tensor([ids]), output_hidden_states=True)
    # HF hidden_states[i + 1] is layer i's output, except the last one (final norm applied)
    for i in range(src.config.num_layers - 1):
        assert np.abs(hidden[i] - out.hidden_states[i + 1][0].numpy()).max() <= 1e-4
    assert np.abs(logits - out.logits[0].numpy()).max() <= 1e-3


# ---- real model: tokenizer, chat template, streaming, stop strings

@pytest.fixture(scope="module")
def smol(smollm2_int4_dir):
    return edgeact.load(smollm2_int4_dir, engine="ort")


def test_chat_template_matches_transformers(smol, smollm2_gguf):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
    ours = smol.apply_chat_template(msgs)
    assert ours == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert smol.tokenize(ours, add_special_tokens=False) == hf(ours, add_special_tokens=False).input_ids


def test_chat_stream_and_stop(smol):
    pieces = []
    res = smol.chat("What is the capital of France?", max_new_tokens=24, on_text=pieces.append)
    assert "".join(pieces) == res.text
    assert "Paris" in res.text
    assert res.finish_reason in ("eos", "length")
    stopped = smol.chat("What is the capital of France?", max_new_tokens=24, stop="Paris")
    assert stopped.finish_reason == "stop" and "Paris" not in stopped.text
    assert res.text.startswith(stopped.text)


def test_stream_decoder_joins_split_utf8(smol):
    from edgeact.tokenizer import StreamDecoder

    text = "héllo wörld — 日本語 🙂"
    ids = smol.tokenize(text, add_special_tokens=False)
    dec = StreamDecoder(smol.tokenizer)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
