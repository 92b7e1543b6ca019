"""The native runtime on the families beside Llama (Gemma 2/3, Qwen3, Phi-3) against onnxruntime on the
same folder: GELU-tanh, q/k norm, Gemma's norms and embedding scale, sliding-window layers (decoding far
past the window, through the cache's compaction), soft-caps, and the tied table stored once.
fp32: max |Δlogit| <= 1e-3 over a prefill and single-token decode steps; int4: KL and top-1 over 256
tokens (BOUNDS below).
"""
from __future__ import annotations

import numpy as np
import pytest

runtime = pytest.importorskip("edgeact.runtime")
if not runtime.available():
    pytest.skip(runtime.unavailable_reason(), allow_module_level=True)

from edgeact.converters.convert import convert  # noqa: E402
from edgeact.converters.model import ModelConfig  # noqa: E402
from edgeact.converters.random_model import SHAPES, random_source  # noqa: E402
from edgeact.runtime import NativeModel  # noqa: E402
from test_native_engine import OrtRef, _ids, _kl_top1  # noqa: E402

GEMMA2 = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=2,
                     head_dim=16, rope_theta=10000.0, max_position_embeddings=512, arch="gemma2", hidden_act="gelu_tanh",
                     norm_offset=1.0, embedding_multiplier=8.0, sandwich_norms=True, attention_scale=0.25,
                     sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                     attn_logit_softcapping=2.0, final_logit_softcapping=3.0, tie_word_embeddings=True)
SOURCES = {
    "gemma3": lambda: random_source("gemma3-tiny", seed=1, max_position_embeddings=512),
    "qwen3": lambda: random_source("qwen3-tiny", seed=1, max_position_embeddings=512),
    "gemma2-softcap": lambda: random_source(GEMMA2, seed=1),
    "phi3-partial": lambda: random_source("tiny", seed=1, arch="phi3", partial_rotary_factor=0.5,
                                          max_position_embeddings=512),
}


@pytest.fixture(scope="module", params=list(SOURCES))
def family(request, tmp_path_factory):
    src = SOURCES[request.param]()
    root = tmp_path_factory.mktemp(request.param)
    dirs = {"fp32": convert(src, root / "fp32", quant="fp32", progress=False),
            # a float table of its own: at level 4 the shared int8 table's rows put more activations on
            # rounding ties (test_native_engine); the shared table is held at level 1 below
            "int4": convert(src, root / "int4", quant="int4", embedding="fp16", progress=False),
            "int4-acc1": convert(src, root / "int4-acc1", quant="int4", accuracy_level=1, progress=False)}
    if src.config.tie_word_embeddings:
        dirs["int4-shared"] = convert(src, root / "int4-shared", quant="int4", lm_head="int4", embedding="shared",
                                      accuracy_level=1, progress=False)
    return request.param, dirs


def test_fp32_prefill_and_decode_past_the_window(family):
    """100 positions: 12 prefilled in chunks of 5, then 88 single tokens; a window of 8 keeps a cache of
    8 + 63 rows, which fills and moves its rows to the front once."""
    _, dirs = family
    model, ref = NativeModel(dirs["fp32"]), OrtRef(dirs["fp32"])
    sess = model.session(threads=2, max_chunk=5)
    ids = _ids(model.vocab, 100, seed=4)
    got, want = sess.forward(ids[:12], all_logits=True), ref.forward(ids[:12])
    assert np.abs(got - want).max() <= 1e-3
    for t in ids[12:]:
        assert np.abs(sess.forward([t]) - ref.forward([t])[-1]).max() <= 1e-3


def test_fp32_long_prefill_equals_onnxruntime(family):
    _, dirs = family
    model, ref = NativeModel(dirs["fp32"]), OrtRef(dirs["fp32"])
    ids = _ids(model.vocab, 150, seed=5)
    got = model.session(threads=2, max_chunk=64).forward(ids, all_logits=True)
    assert np.abs(got - ref.forward(ids)).max() <= 1e-3


# Float activations (accuracy_level 1): the engines differ by summation order only (test_native_engine
# measures KL ~1e-13 on tiny models; bound 1e-10). Level 4 rounds activations to int8 per block, and Gemma's
# embedding scale (x8 here) and sandwich norms make ties flip where the llama tiny model has none: held to
# the spec bound (KL 1e-3, top-1 99%), as test_native_engine does for real models at level 4.
BOUNDS = {"int4": (1e-3, 0.99), "int4-acc1": (1e-10, 0.99), "int4-shared": (1e-10, 0.99)}


@pytest.mark.parametrize("kind", list(BOUNDS))
def test_int4_matches_onnxruntime(family, kind):
    _, dirs = family
    if kind not in dirs:
        pytest.skip("untied model: no shared table")
    model, ref = NativeModel(dirs[kind]), OrtRef(dirs[kind])
    ids = _ids(model.vocab, 256, seed=6)
    kl, top1 = _kl_top1(ref.forward(ids), model.session(threads=2).forward(ids, all_logits=True))
    assert kl <= BOUNDS[kind][0] and top1 >= BOUNDS[kind][1], (kl, top1)


def test_sliding_cache_memory_stops_at_the_window(tmp_path):
    """A sliding layer's cache is its window plus the slack whatever n_ctx: only full layers grow with it."""
    src = random_source("gemma3-tiny", seed=1, max_position_embeddings=4096)
    folder = convert(src, tmp_path / "g", quant="int4", progress=False)
    model = NativeModel(folder)
    small = model.session(threads=1, n_ctx=256, max_chunk=64)
    large = model.session(threads=1, n_ctx=4096, max_chunk=64)
    c = SHAPES["gemma3-tiny"]
    row = 2 * 4 * c.num_kv_heads * c.head_dim   # a position's k and v, float32
    assert large.memory_bytes - small.memory_bytes == c.layer_types.count("full_attention") * (4096 - 256) * row


def test_truncate_within_the_slack_and_refused_beyond(tmp_path):
    src = random_source("gemma3-tiny", seed=1, max_position_embeddings=512)
    folder = convert(src, tmp_path / "g", quant="fp32", progress=False)
    model, ref = NativeModel(folder), OrtRef(folder)
    ids = _ids(model.vocab, 120, seed=7)
    sess = model.session(threads=1)
    sess.forward(ids)
    sess.truncate(110)   # 10 back: the window's rows are still held
    ref.forward(ids[:110])
    assert np.abs(sess.forward(ids[110:], all_logits=True) - ref.forward(ids[110:])).max() <= 1e-3
    with pytest.raises(Exception, match="sliding-window layer"):
        sess.truncate(40)


@pytest.mark.qemu
@pytest.mark.parametrize("shape,kw", [("gemma3-tiny", dict(lm_head="int4", embedding="shared")), ("qwen3-tiny", {}),
                                      ("gemma3-tiny", {})])
def test_aarch64_cli_under_qemu(tmp_path, shape, kw):
    """The NEON build (android-demo's static CLI under qemu-aarch64) gives onnxruntime's greedy tokens, 30 of
    them past a window of 8 (float activations: the engines differ by summation order only)."""
    import shutil

    import edgeact
    from test_android_demo import _build, _tokens

    if not shutil.which("aarch64-linux-gnu-gcc") or not shutil.which("qemu-aarch64"):
        pytest.skip("aarch64-linux-gnu-gcc / qemu-aarch64 not installed (apt-get install gcc-aarch64-linux-gnu qemu-user)")
    folder = convert(random_source(shape, seed=5, max_position_embeddings=512), tmp_path / "m", quant="int4",
                     accuracy_level=1, progress=False, **kw)
    _build("cli-aarch64", tmp_path)
    want = edgeact.load(folder, engine="ort").generate([1, 5, 7], max_new_tokens=30).ids
    got = _tokens(["qemu-aarch64", "-cpu", "max", str(tmp_path / "edgeact-cli-aarch64"), str(folder), "-n", "30",
                   "1", "5", "7"])
    assert got == want


def test_chat_session_starts_over_when_the_window_is_gone(tmp_path):
    """A conversation whose prefix diverges further back than a sliding cache holds prefills again
    from the start (the native engine refuses that truncation) and gives onnxruntime's logits."""
    import edgeact

    src = random_source("gemma3-tiny", seed=1, max_position_embeddings=512)
    folder = convert(src, tmp_path / "g", quant="fp32", progress=False)
    native, ref = edgeact.load(folder, engine="native"), OrtRef(folder)
    sess = native.session()
    ids = _ids(300, 120, seed=8).tolist()
    sess.prefill(ids)
    other = ids[:40] + _ids(300, 20, seed=9).tolist()
    got = sess.prefill(other)
    assert sess.last["cached_tokens"] == 0
    assert np.abs(got - ref.forward(np.array(other))[-1]).max() <= 1e-3
