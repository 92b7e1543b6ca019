"""Evaluation metrics against numpy definitions, and the quality ordering on real
fp32 weights (stories260K): KL(int8) < KL(int4 g32) < KL(int4 g128)."""
import numpy as np
import pytest

from edgeact.converters.convert import convert
from edgeact.evaluate import Reference, compare_logits


def test_metrics_against_definitions():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((9, 20))
    ids = rng.integers(0, 20, 9)
    same = compare_logits(ref, ref, ids)
    assert same.kl == pytest.approx(0, abs=1e-12) and same.top1 == 1.0 and same.ppl_ratio == pytest.approx(1)
    other = ref + rng.standard_normal((9, 20)) * 0.5
    q = compare_logits(other, ref, ids)
    p = np.exp(ref[:-1]) / np.exp(ref[:-1]).sum(-1, keepdims=True)
    r = np.exp(other[:-1]) / np.exp(other[:-1]).sum(-1, keepdims=True)
    assert q.kl == pytest.approx(float((p * np.log(p / r)).sum(-1).mean()), rel=1e-9)
    assert q.ppl_ref == pytest.approx(float(np.exp(-np.log(p[np.arange(8), ids[1:]]).mean())), rel=1e-9)


def test_quality_ordering_stories260k(stories260k, tmp_path):
    ref = Reference(stories260k, n_tokens=256, seed=0)
    kls = {}
    for name, kw in {"int8": dict(quant="int8"), "int4-g32": dict(quant="int4", group_size=32),
                     "int4-g128": dict(quant="int4", group_size=128)}.items():
        out = convert(stories260k, tmp_path / name, progress=False, **kw)
        kls[name] = ref.compare(out).kl
    assert kls["int8"] < kls["int4-g32"] < kls["int4-g128"], kls


def test_reference_cache_reused_and_keyed(tmp_path, monkeypatch):
    """`edgeact eval` keeps a file source's tokens and logits: a second run with the same settings loads
    them without building the fp32 model; another seed, or a changed file, computes afresh."""
    import edgeact.converters.torch_ref as torch_ref
    from edgeact.converters.gguf_export import write_gguf
    from edgeact.converters.random_model import random_source

    gguf_path = write_gguf(random_source("tiny", seed=3), tmp_path / "t.gguf", dtype="f32", context_length=256)
    first = Reference(gguf_path, n_tokens=24, seed=1, cache_dir=tmp_path / "c")
    assert len(list((tmp_path / "c").glob("*.npz"))) == 1
    build = torch_ref.build_torch_model

    def refuse(*a, **k):
        raise AssertionError("the fp32 model was built again")

    monkeypatch.setattr(torch_ref, "build_torch_model", refuse)
    again = Reference(gguf_path, n_tokens=24, seed=1, cache_dir=tmp_path / "c")
    assert np.array_equal(again.ids, first.ids) and np.array_equal(again.logits, first.logits)
    monkeypatch.setattr(torch_ref, "build_torch_model", build)
    other = Reference(gguf_path, n_tokens=24, seed=2, cache_dir=tmp_path / "c")
    assert not np.array_equal(other.ids, first.ids)
    write_gguf(random_source("tiny", seed=4), gguf_path, dtype="f32", context_length=256)
    changed = Reference(gguf_path, n_tokens=24, seed=1, cache_dir=tmp_path / "c")
    assert not np.array_equal(changed.logits, first.logits)
    assert len(list((tmp_path / "c").glob("*.npz"))) == 3


def test_against_llama_cpp(tmp_path, capsys, monkeypatch):
    """`edgeact eval --against-llama-cpp`: llama.cpp quantizes the --ref GGUF with its own API and runs
    every file on the same tokens. Its own f32 source agrees with our fp32 reference (engine noise
    only); Q8_0 is closer than Q4_0 and Q4_0's file is smaller; the plot is written."""
    pytest.importorskip("llama_cpp")
    import json

    monkeypatch.setenv("EDGEACT_HOME", str(tmp_path / "home"))   # the reference cache

    from edgeact.cli import main
    from edgeact.converters.gguf_export import write_gguf
    from edgeact.converters.random_model import random_source

    src = random_source("tiny", seed=3, hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2,
                        head_dim=64, vocab_size=512)
    gguf_path = write_gguf(src, tmp_path / "tiny.gguf", dtype="f32", context_length=256)
    png = tmp_path / "kl.png"
    assert main(["eval", "--ref", str(gguf_path), "--tokens", "48", "--against-llama-cpp", "Q8_0,Q4_0",
                 "--llama-cpp-dir", str(tmp_path / "lc"), "--plot", str(png), "--json"]) == 0
    rows = {r["model"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert set(rows) == {"llama.cpp source", "llama.cpp Q8_0", "llama.cpp Q4_0"}
    assert rows["llama.cpp source"]["kl"] < 1e-3 and rows["llama.cpp source"]["top1"] > 0.95
    assert rows["llama.cpp Q8_0"]["kl"] < rows["llama.cpp Q4_0"]["kl"]
    assert rows["llama.cpp Q4_0"]["bytes"] < rows["llama.cpp Q8_0"]["bytes"] < rows["llama.cpp source"]["bytes"]
    assert png.stat().st_size > 1000
