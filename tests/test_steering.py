"""Steering: request semantics (numpy), vectors from contrastive prompts (torch reference), and the
steering points of the engines (onnxruntime, native) on small random model folders."""
from __future__ import annotations

import numpy as np
import pytest

from edgeact.control_vector import save_control_vector
from edgeact.steering import (Steering, apply_steering_args, add_steering_args, as_directions,
                              compute_vectors, orthonormal_rows, parse_layers, parse_steer_spec, steer_hidden,
                              torch_source)

H, L = 16, 4


# --- request semantics --------------------------------------------------------------------------

def test_parse_layers_forms_and_range():
    assert parse_layers("2-4,7", 10) == [2, 3, 4, 7]
    assert parse_layers([3, 1, 3], 10) == [1, 3]
    assert parse_layers(5, 10) == [5]
    assert parse_layers(None, 10) is None
    for bad, msg in (("4-2", "end before start"), ("a-b", "bad layer range"), (10, "out of range"),
                     ([-1], "out of range"), ([], "no layers")):
        with pytest.raises(ValueError, match=msg):
            parse_layers(bad, 10)


def test_orthonormal_rows_span_the_directions():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(H), rng.standard_normal(H)
    rows = orthonormal_rows(np.stack([a, 3 * a, b, np.zeros(H), a - 2 * b]))
    assert rows.shape == (2, H)  # 3a, a-2b are dependent; the zero row carries no direction
    np.testing.assert_allclose(rows @ rows.T, np.eye(2), atol=1e-6)
    for v in (a, b):  # both directions lie in the span: projecting onto it keeps them whole
        np.testing.assert_allclose(rows.T @ (rows @ v), v, atol=1e-5)


def test_adds_sum_with_per_layer_scales_and_ablations_stack():
    rng = np.random.default_rng(1)
    st = Steering(L, H)
    v1, v2, a1, a2 = (rng.standard_normal(H).astype(np.float32) for _ in range(4))
    st.entries.append(st.make_entry(v1, scale={1: 2.0, 2: -0.5}, layers=[1, 2]))
    st.entries.append(st.make_entry({2: v2, 3: v2}, scale=3.0))
    st.entries.append(st.make_entry(a1, mode="ablate", layers=[2]))
    st.entries.append(st.make_entry(a2, mode="ablate", layers="2-3", apply_to="generated"))
    prefill, decode = st.layer_inputs(generated=False), st.layer_inputs(generated=True)
    assert sorted(prefill) == [1, 2, 3] and sorted(decode) == [1, 2, 3]
    np.testing.assert_allclose(prefill[1][0], 2 * v1, rtol=1e-6)
    np.testing.assert_allclose(prefill[2][0], -0.5 * v1 + 3 * v2, rtol=1e-6)
    assert prefill[2][1].shape == (1, H) and prefill[3][1] is None
    assert decode[2][1].shape == (2, H) and decode[3][1].shape == (1, H)

    h = rng.standard_normal((5, H)).astype(np.float32) * 10
    add, ablate = decode[2]
    y = steer_hidden(h, None, ablate)
    for a in (a1, a2):
        unit = a / np.linalg.norm(a)
        assert np.all(np.abs(y @ unit) <= 1e-4 * np.linalg.norm(h, axis=1))
    # Components orthogonal to both directions are untouched.
    q, _ = np.linalg.qr(np.stack([a1, a2]).T)
    rest = h - (h @ q) @ q.T
    np.testing.assert_allclose(y, rest, atol=1e-4)


def test_zero_vectors_and_zero_scales_leave_layers_unsteered():
    st = Steering(L, H)
    v = np.ones(H, np.float32)
    st.entries += [st.make_entry(v, scale=0.0, layers=1), st.make_entry(np.zeros(H), layers=[0, 2]),
                   st.make_entry(np.zeros(H), mode="ablate", layers=3), st.make_entry(v, scale=1, layers=2),
                   st.make_entry(-v, scale=1, layers=2)]
    assert st.layer_inputs(generated=True) == {}


@pytest.mark.parametrize("vec, kw, message", [
    (np.ones(H + 1), dict(layers=1), "hidden size is 16"),
    (np.ones(H), dict(layers=L), "out of range"),
    ({L + 2: np.ones(H)}, {}, "out of range"),
    (np.r_[np.ones(H - 1), np.nan], dict(layers=1), "NaN"),
    (np.ones(H), dict(layers=1, scale=float("inf")), "finite"),
    (np.ones(H), dict(layers=1, mode="scale"), "mode"),
    (np.ones(H), dict(layers=1, apply_to="prompt"), "apply_to"),
    (np.ones(H), dict(layers=1, mode="ablate", scale=0.5), "scale must be 1"),
    ({1: np.ones(H)}, dict(layers=[2]), "no direction for layer"),
    (np.ones((L + 1, H)), {}, "num_layers"),
    ("/nonexistent/vector.gguf", {}, "not found"),
])
def test_bad_requests_raise_and_change_nothing(vec, kw, message):
    st = Steering(L, H)
    good = st.make_entry(np.ones(H), layers=1)
    st.entries.append(good)
    before = st.layer_inputs(generated=True)
    with pytest.raises(ValueError, match=message):
        st.make_entry(vec, **kw)
    assert st.entries == [good]
    np.testing.assert_array_equal(st.layer_inputs(generated=True)[1][0], before[1][0])


def test_file_vectors_and_run_options(tmp_path):
    rng = np.random.default_rng(2)
    d = {1: rng.standard_normal(H).astype(np.float32), 3: rng.standard_normal(H).astype(np.float32)}
    path = save_control_vector(tmp_path / "v.gguf", d)
    np.testing.assert_array_equal(as_directions(str(path), L, H, layers="3")[3], d[3])
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        as_directions(bad, L, H)
    with pytest.raises(ValueError, match="hidden size is 8"):
        as_directions(path, L, 8)

    assert parse_steer_spec("a/b.gguf:4.5") == ("a/b.gguf", 4.5)
    assert parse_steer_spec("C:/dir/v.gguf") == ("C:/dir/v.gguf", 1.0)
    with pytest.raises(ValueError, match="scale after ':' must be a number, not 'abc'"):
        parse_steer_spec("cheerful.gguf:abc")
    with pytest.raises(ValueError, match="finite"):
        parse_steer_spec("cheerful.gguf:nan")

    import argparse

    parser = argparse.ArgumentParser()
    add_steering_args(parser)
    args = parser.parse_args(["--steer", f"{path}:-2", "--ablate", str(path), "--steer-layers", "3"])
    calls = []

    class Recorder:
        def steer(self, vec, **kw):
            calls.append((vec, kw))

    apply_steering_args(Recorder(), args)
    assert calls == [(str(path), dict(scale=-2.0, layers="3", mode="add", apply_to="all")),
                     (str(path), dict(layers="3", mode="ablate", apply_to="all"))]


# --- computing vectors (torch reference on a tiny random source) --------------------------------

@pytest.fixture(scope="module")
def tiny_source():
    from edgeact.converters.random_model import random_source

    return random_source("tiny")


def _prompts(rng, vocab, n):
    return [list(rng.integers(3, vocab, size=rng.integers(2, 7))) for _ in range(n)]


def test_torch_hidden_states_are_block_outputs(tiny_source):
    torch = pytest.importorskip("torch")
    from edgeact.converters.torch_ref import build_torch_model

    ids = [5, 9, 2, 7, 11]
    ours = torch_source(tiny_source).hidden(ids)
    with torch.no_grad():
        hf = build_torch_model(tiny_source)(torch.tensor([ids]), output_hidden_states=True).hidden_states
    n = tiny_source.config.num_layers
    assert ours.shape == (n, len(ids), tiny_source.config.hidden_size)
    for i in range(n - 1):  # HF's last entry has the final norm applied; the others are block outputs
        np.testing.assert_allclose(ours[i], hf[i + 1][0].numpy(), rtol=1e-5, atol=1e-5)


def test_mean_diff_and_pca_against_numpy(tiny_source):
    rng = np.random.default_rng(3)
    vocab = tiny_source.config.vocab_size
    pos, neg = _prompts(rng, vocab, 6), _prompts(rng, vocab, 6)
    src = torch_source(tiny_source)
    feats = {name: np.stack([src.hidden(p)[:, -1] for p in ps], 1).astype(np.float64)
             for name, ps in (("pos", pos), ("neg", neg))}
    md = compute_vectors(src, pos, neg, method="mean-diff")
    pca = compute_vectors(src, pos, neg, method="pca", layers="0-1")
    assert sorted(md) == list(range(tiny_source.config.num_layers)) and sorted(pca) == [0, 1]
    for layer in md:
        expect = feats["pos"][layer].mean(0) - feats["neg"][layer].mean(0)
        np.testing.assert_allclose(md[layer], expect, rtol=1e-4, atol=1e-5)
    for layer in pca:
        diffs = feats["pos"][layer] - feats["neg"][layer]
        top = np.linalg.eigh(diffs.T @ diffs)[1][:, -1]
        v = pca[layer]
        assert abs(abs(v @ top) / np.linalg.norm(v) - 1) < 1e-4  # the first principal direction
        assert v @ md[layer] > 0  # sign follows the mean difference
        np.testing.assert_allclose(np.linalg.norm(v), abs((diffs @ top).mean()), rtol=1e-4)
    mean_pos = compute_vectors(src, pos, neg, layers=[1], position="mean")[1]
    expect = np.mean([src.hidden(p)[1].mean(0) for p in pos], 0) - np.mean([src.hidden(p)[1].mean(0) for p in neg], 0)
    np.testing.assert_allclose(mean_pos, expect, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="pca pairs prompts"):
        compute_vectors(src, pos, neg[:-1], method="pca")
    with pytest.raises(ValueError, match="no tokenizer|method"):
        compute_vectors(src, pos, neg, method="svd")


# --- the engines' steering points (small random fp32 folder) ------------------------------------

def _native_available() -> bool:
    try:
        from edgeact.engines import native_available
    except ImportError:
        return False
    return native_available()


ENGINES = ["ort", pytest.param("native", marks=pytest.mark.skipif(
    not _native_available(), reason="native engine not available (runtime not built or no native_engine)"))]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_source):
    from edgeact.converters.convert import convert

    out = tmp_path_factory.mktemp("steering") / "tiny-fp32"
    convert(tiny_source, out, quant="fp32", progress=False)
    return out


def _load(folder, engine):
    import edgeact

    return edgeact.load(folder, engine=engine)


IDS = np.array([3, 17, 5, 9, 22, 4], dtype=np.int64)


def _forward(m):
    m.engine.reset()
    logits, hidden = m.engine.forward(IDS, output_hidden=True)
    return np.asarray(logits, np.float32), np.asarray(hidden, np.float32)


@pytest.mark.parametrize("engine", ENGINES)
def test_zero_vector_or_zero_scale_is_exactly_unsteered(tiny_dir, engine):
    m = _load(tiny_dir, engine)
    cfg = m.config
    base, _ = _forward(m)
    m.steer(np.zeros(cfg.hidden_size), layers=None)  # every layer, zero
    np.testing.assert_array_equal(_forward(m)[0], base)
    m.clear_steering()
    v = np.random.default_rng(4).standard_normal(cfg.hidden_size)
    m.steer(v, scale=0.0, layers=[0, cfg.num_layers - 1])
    m.steer(np.zeros(cfg.hidden_size), mode="ablate", layers=1)
    np.testing.assert_array_equal(_forward(m)[0], base)
    m.clear_steering()
    m.steer(v, scale=3.0, layers=1)
    assert np.abs(_forward(m)[0] - base).max() > 1e-3  # the same vector, scaled, does act
    m.clear_steering()
    np.testing.assert_array_equal(_forward(m)[0], base)


@pytest.mark.parametrize("engine", ENGINES)
def test_add_moves_that_layer_by_exactly_alpha_v(tiny_dir, engine):
    m = _load(tiny_dir, engine)
    base_logits, base = _forward(m)
    layer, alpha = 1, 2.5
    v = np.random.default_rng(5).standard_normal(m.config.hidden_size).astype(np.float32)
    with m.steering(v, scale=alpha, layers=layer):
        logits, hidden = _forward(m)
    np.testing.assert_array_equal(hidden[:layer], base[:layer])  # earlier layers untouched
    delta = hidden[layer] - base[layer]
    tol = 1e-5 * (np.abs(base[layer]).max() + np.abs(alpha * v).max())
    np.testing.assert_allclose(delta, np.broadcast_to(alpha * v, delta.shape), rtol=0, atol=tol)
    assert np.abs(logits - base_logits).max() > 1e-3
    np.testing.assert_array_equal(_forward(m)[0], base_logits)  # the context manager restored it


@pytest.mark.parametrize("engine", ENGINES)
def test_ablate_removes_the_direction_at_that_layer(tiny_dir, engine):
    m = _load(tiny_dir, engine)
    _, base = _forward(m)
    rng = np.random.default_rng(6)
    layer = m.config.num_layers - 1
    # A direction the hidden states really have: their mean, plus a random one stacked with it.
    d1, d2 = base[layer].mean(0), rng.standard_normal(m.config.hidden_size)
    m.steer(d1, mode="ablate", layers=layer)
    m.steer({layer: d2}, mode="ablate")
    _, hidden = _forward(m)
    np.testing.assert_array_equal(hidden[:layer], base[:layer])
    h = hidden[layer]
    for d in (d1, d2):
        unit = d / np.linalg.norm(d)
        assert np.all(np.abs(h @ unit) <= 1e-4 * np.linalg.norm(h, axis=1))
    np.testing.assert_allclose(h, steer_hidden(base[layer], None, orthonormal_rows(np.stack([d1, d2]))),
                               rtol=1e-4, atol=1e-4 * np.abs(base[layer]).max())


def test_native_and_onnxruntime_agree_when_steered(tiny_dir):
    if not _native_available():
        pytest.skip("native engine not available (runtime not built or no native_engine)")
    results = []
    for engine in ("ort", "native"):
        m = _load(tiny_dir, engine)
        H_, n = m.config.hidden_size, m.config.num_layers
        r = np.random.default_rng(7)
        m.steer(r.standard_normal((n, H_)), scale=1.5)
        m.steer(r.standard_normal(H_), mode="ablate", layers=[0, n - 1])
        results.append(_forward(m))
    np.testing.assert_allclose(results[1][0], results[0][0], atol=1e-3, rtol=0)
    np.testing.assert_allclose(results[1][1], results[0][1], atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("engine", ENGINES)
def test_bad_inputs_raise_and_the_model_stays_unsteered(tiny_dir, engine, tmp_path):
    m = _load(tiny_dir, engine)
    cfg = m.config
    base, _ = _forward(m)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\x00" * 64)
    wrong_width = save_control_vector(tmp_path / "wide.gguf", {1: np.ones(cfg.hidden_size + 3)})
    bad = [
        (dict(vec_or_path=np.ones(cfg.hidden_size - 1), layers=0), "hidden size"),
        (dict(vec_or_path=np.ones(cfg.hidden_size), layers=cfg.num_layers), "out of range"),
        (dict(vec_or_path=np.full(cfg.hidden_size, np.nan), layers=0), "NaN"),
        (dict(vec_or_path=np.full(cfg.hidden_size, np.inf), layers=0, mode="ablate"), "NaN or Inf"),
        (dict(vec_or_path=str(junk)), "not a readable GGUF"),
        (dict(vec_or_path=tmp_path / "missing.gguf"), "not found"),
        (dict(vec_or_path=wrong_width), "hidden size"),
    ]
    for kw, message in bad:
        with pytest.raises(ValueError, match=message):
            m.steer(**kw)
        np.testing.assert_array_equal(_forward(m)[0], base)


@pytest.mark.parametrize("engine", ENGINES)
def test_generated_only_vectors_switch_on_for_decode(tiny_dir, engine):
    m = _load(tiny_dir, engine)
    base, _ = _forward(m)
    v = np.random.default_rng(8).standard_normal(m.config.hidden_size)
    m.steer(v, scale=4.0, layers=1, apply_to="generated")
    np.testing.assert_array_equal(_forward(m)[0], base)  # prefill: off
    m.steering_phase(generated=True)
    steered, _ = _forward(m)
    m.steering_phase(generated=False)
    np.testing.assert_array_equal(_forward(m)[0], base)
    with m.steering(v, scale=4.0, layers=1):
        np.testing.assert_allclose(_forward(m)[0], steered, rtol=0, atol=0)


def test_vectors_from_the_engine_match_the_torch_reference(tiny_dir, tiny_source):
    rng = np.random.default_rng(9)
    vocab = tiny_source.config.vocab_size
    pos, neg = _prompts(rng, vocab, 4), _prompts(rng, vocab, 4)
    m = _load(tiny_dir, "ort")
    for method in ("mean-diff", "pca"):
        ours = compute_vectors(m, pos, neg, method=method)
        ref = compute_vectors(tiny_source, pos, neg, method=method)
        for layer in ref:
            np.testing.assert_allclose(ours[layer], ref[layer], rtol=1e-3, atol=1e-4 * np.abs(ref[layer]).max())


def test_steer_cli_info_and_errors(tmp_path, tiny_dir, capsys):
    from edgeact.cli import main

    v = {1: np.arange(48, dtype=np.float32)}
    path = save_control_vector(tmp_path / "v.gguf", v)
    assert main(["steer", "info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "n_embd 48" in out and "layer   1" in out and f"{np.linalg.norm(v[1]):.4g}" in out
    pos = tmp_path / "pos.txt"
    pos.write_text("a happy line\n")
    # The random tiny folder has no tokenizer: text prompts are refused in one line.
    assert main(["steer", "compute", str(tiny_dir), "--pos", str(pos), "--neg", str(pos),
                 "-o", str(tmp_path / "out.gguf"), "--engine", "ort"]) == 2
    assert "no tokenizer" in capsys.readouterr().err
    assert main(["steer", "info", str(tmp_path / "missing.gguf")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.fixture(scope="module")
def baked_dir(tiny_dir, tmp_path_factory):
    """tiny_dir with non-zero steering defaults written into the file: steer.1.add = v and
    steer.0.ablate = [d] (a folder someone shipped pre-steered)."""
    import shutil

    import onnx
    from onnx import numpy_helper

    out = tmp_path_factory.mktemp("baked") / "tiny-baked"
    shutil.copytree(tiny_dir, out)
    m = onnx.load(str(out / "model.onnx"))
    H_ = next(numpy_helper.to_array(t) for t in m.graph.initializer if t.name == "steer.1.add").shape[0]
    rng = np.random.default_rng(11)
    vecs = {"steer.1.add": (2.0 * rng.standard_normal(H_)).astype(np.float32),
            "steer.0.ablate": (rng.standard_normal((1, H_)) / np.sqrt(H_)).astype(np.float32)}
    vecs["steer.0.ablate"] /= np.linalg.norm(vecs["steer.0.ablate"])
    for t in m.graph.initializer:
        if t.name in vecs:
            t.CopyFrom(numpy_helper.from_array(vecs[t.name], t.name))
    onnx.save(m, str(out / "model.onnx"))
    return out, vecs["steer.1.add"], vecs["steer.0.ablate"]


@pytest.mark.parametrize("engine", ENGINES)
def test_baked_steering_defaults_act_on_both_engines(tiny_dir, baked_dir, engine):
    """A non-zero steer.{i}.add / steer.{i}.ablate initializer is the folder's default steering:
    it acts with nothing set at run time, exactly as the same vectors set on the plain folder;
    a run-time vector replaces it and clearing returns to it."""
    folder, v, a = baked_dir
    plain = _load(tiny_dir, engine)
    base = _forward(plain)[0]
    plain.engine.set_steering(1, add=v)
    plain.engine.set_steering(0, ablate=a)
    want = _forward(plain)[0]
    assert np.abs(want - base).max() > 0.1   # the vectors do act on this model
    baked = _load(folder, engine)
    got = _forward(baked)[0]
    # Same engine, same graph, same vectors (the default and the override feed the same Steer node).
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    zero = np.zeros_like(v)
    baked.engine.set_steering(1, add=zero, ablate=np.zeros_like(a))
    baked.engine.set_steering(0, add=zero, ablate=np.zeros_like(a))
    np.testing.assert_allclose(_forward(baked)[0], base, rtol=0, atol=1e-5 * np.abs(base).max())
    baked.engine.clear_steering()
    np.testing.assert_allclose(_forward(baked)[0], want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_baked_steering_defaults_agree_across_engines(baked_dir):
    if not _native_available():
        pytest.skip("native engine not available (runtime not built or no native_engine)")
    folder, _, _ = baked_dir
    ort_l, nat_l = (_forward(_load(folder, e))[0] for e in ("ort", "native"))
    # fp32 folder: the engines differ only in summation order (measured 4e-7 of the logits' range;
    # 10x that, since the order depends on the ISA and thread count)
    np.testing.assert_allclose(nat_l, ort_l, rtol=0, atol=4e-6 * np.abs(ort_l).max())
