"""Engine.forward(ids, logits="last"|"all"): the last row alone equals the last of all rows,
and generation's prompt pass asks the engine for one row of logits (the vocabulary projection
is the widest matmul: computing every prompt row's is work llama.cpp does not do)."""
from __future__ import annotations

import numpy as np
import pytest

import edgeact
from edgeact.converters.convert import convert
from edgeact.converters.random_model import random_source
from edgeact.engines import make_engine, native_available

ENGINES = ["ort", "torch", pytest.param("native", marks=pytest.mark.skipif(not native_available(),
                                                                   reason="native runtime not built"))]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return convert(random_source("tiny", seed=11), tmp_path_factory.mktemp("logits") / "t", quant="int4",
                   progress=False)


@pytest.mark.parametrize("engine", ENGINES)
def test_last_row_equals_the_last_of_all_rows(folder, engine):
    eng = make_engine(folder, engine, threads=1)
    eng.max_context = 64
    ids = np.array([1, 5, 9, 200, 17, 3, 4, 8, 60, 2], np.int64)
    eng.reset()
    full = eng.forward(ids, logits="all")
    eng.reset()
    last = eng.forward(ids, logits="last")
    assert full.shape == (ids.size, eng.vocab_size) and last.shape == (1, eng.vocab_size)
    np.testing.assert_allclose(last[0], full[-1], rtol=1e-4, atol=1e-4)
    # the cache advanced the same way: the next token's logits agree
    nxt = eng.forward(np.array([7]), logits="last")
    eng.reset()
    eng.forward(ids)
    np.testing.assert_allclose(nxt, eng.forward(np.array([7]))[-1:], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="logits must be"):
        eng.forward(ids[:1], logits="first")


@pytest.mark.skipif(not native_available(), reason="native runtime not built")
def test_generate_computes_one_logit_row_per_forward(folder):
    m = edgeact.load(folder, engine="native", threads=1)
    m.eos_token_ids = set()
    eng = m.engine
    eng.logit_rows = 0
    res = m.generate(list(range(3, 40)), max_new_tokens=6)
    assert len(res.ids) == 6
    # 1 for the 37-token prompt, then one per decode step (the 6th token needs no forward)
    assert eng.logit_rows == 1 + 5
    eng.logit_rows = 0
    sess = m.session()
    sess.generate(list(range(3, 20)), max_new_tokens=3)
    assert sess.engine.logit_rows == 1 + 2
    # forward() is asked for every row, and computes them
    eng.logit_rows = 0
    assert m.forward(list(range(3, 13))).shape[0] == 10 and eng.logit_rows == 10


def test_llama_cpp_engine_last_row(folder, tmp_path, monkeypatch):
    """The llama.cpp baseline behind the same interface, on a GGUF of the same weights."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from edgeact.bench import subjects

    monkeypatch.setattr(subjects, "CACHE", tmp_path)
    meta = edgeact.engines.read_meta(folder)
    gguf = subjects.llamacpp_gguf(folder, meta, ftype="f16", progress=lambda *_: None)
    ids = np.array([1, 5, 9, 200, 17, 3], np.int64)
    full = make_engine(folder, "llama.cpp-py", threads=1, gguf=gguf, n_ctx=64, logits_all=True)
    a = full.forward(ids, logits="all")
    assert a.shape == (ids.size, full.vocab_size) and full.logit_rows == ids.size
    last = make_engine(folder, "llama.cpp-py", threads=1, gguf=gguf, n_ctx=64)
    b = last.forward(ids, logits="last")
    assert b.shape == (1, full.vocab_size) and last.logit_rows == 1
    np.testing.assert_allclose(b[0], a[-1], rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="logits_all"):
        last.forward(ids[:1], logits="all")
