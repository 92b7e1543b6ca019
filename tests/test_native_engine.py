"""The native runtime against onnxruntime on the same model folder.

fp32: max |Δlogit| <= 1e-3 and identical greedy generations; int4: mean
KL(ort || native) <= 1e-3 nats/token and top-1 agreement >= 99% over 256
tokens; KV-cache decode equals full recompute; steering and hidden-state
capture against the Steer formula; bounded memory over 2,000 decode steps.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

runtime = pytest.importorskip("edgeact.runtime")
if not runtime.available():
    pytest.skip(runtime.unavailable_reason(), allow_module_level=True)
ort = pytest.importorskip("onnxruntime")

from edgeact.converters.convert import convert  # noqa: E402
from edgeact.converters.random_model import random_source  # noqa: E402
from edgeact.runtime import ContextOverflowError, NativeModel  # noqa: E402


class OrtRef:
    """onnxruntime on model.onnx with the KV cache fed back, steering inputs overridable."""

    def __init__(self, folder):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = 2
        self.sess = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.steer: dict[str, np.ndarray] = {}
        self.reset()

    def reset(self):
        self.past = {}
        for n in self.past_names:
            shp = self.inputs[n].shape
            self.past[n] = np.zeros((1, shp[1], 0, shp[3]), np.float32)

    @property
    def n_past(self):
        return next(iter(self.past.values())).shape[2]

    def forward(self, ids):
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        P, S = self.n_past, ids.shape[1]
        feeds = {"input_ids": ids, "seqlens_k": np.array([P + S - 1], np.int32),
                 "total_sequence_length": np.array(P + S, np.int32), **self.past, **self.steer}
        res = dict(zip(self.outputs, self.sess.run(self.outputs, feeds)))
        for n in self.past_names:
            self.past[n] = res[n.replace("past_key_values.", "present.")]
        return res["logits"][0]


def _logsoftmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl_top1(ref, got):
    lp, lq = _logsoftmax(ref), _logsoftmax(got)
    kl = (np.exp(lp) * (lp - lq)).sum(-1).mean()
    return float(kl), float((ref.argmax(-1) == got.argmax(-1)).mean())


def _greedy(step, first, n):
    out, logits = [], step(first)
    for _ in range(n):
        t = int(np.argmax(logits if logits.ndim == 1 else logits[-1]))
        out.append(t)
        logits = step(np.array([t]))
    return out


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("native-tiny")
    src = random_source("tiny", seed=3)
    dirs = {q: convert(src, root / q, quant=q, progress=False) for q in ("fp32", "fp16", "int4", "int8")}
    dirs["int4-acc1"] = convert(src, root / "int4-acc1", quant="int4", accuracy_level=1, progress=False)
    return dirs


def _ids(vocab, n, seed=0):
    return np.random.default_rng(seed).integers(3, vocab, size=n, dtype=np.int64)


# ---- fp32 / fp16: logits and generations ---------------------------------------------------------
@pytest.mark.parametrize("quant", ["fp32", "fp16"])
def test_float_models_match_onnxruntime(tiny_dirs, quant):
    folder = tiny_dirs[quant]
    model, ref = NativeModel(folder), OrtRef(folder)
    sess = model.session(threads=2, max_chunk=16)   # 40 tokens: three prefill chunks
    ids = _ids(model.vocab, 40)
    got, want = sess.forward(ids, all_logits=True), ref.forward(ids)
    assert got.shape == want.shape == (40, model.vocab)
    assert np.abs(got - want).max() <= 1e-3
    # decode steps after the prefill, through the cache
    for t in _ids(model.vocab, 5, seed=1):
        assert np.abs(sess.forward([t]) - ref.forward([t])[-1]).max() <= 1e-3


def test_fp32_greedy_generation_identical(tiny_dirs):
    folder = tiny_dirs["fp32"]
    model, ref = NativeModel(folder), OrtRef(folder)
    sess = model.session(threads=1)
    prompt = _ids(model.vocab, 7, seed=5)
    assert _greedy(sess.forward, prompt, 40) == _greedy(ref.forward, prompt, 40)


def test_kv_cache_decode_equals_full_recompute(tiny_dirs):
    model = NativeModel(tiny_dirs["int4"])
    ids = _ids(model.vocab, 30, seed=2)
    full = model.session(threads=2).forward(ids, all_logits=True)
    inc = model.session(threads=2, max_chunk=4)
    rows = [inc.forward(ids[:9], all_logits=True)]
    rows += [inc.forward(ids[i:i + 1], all_logits=True) for i in range(9, 30)]
    inc_logits = np.concatenate(rows)
    # same kernels, same inputs: only the row grouping of the prefill GEMM differs
    assert np.abs(inc_logits - full).max() <= 1e-4
    assert inc.n_past == 30


# ---- quantized models: KL and top-1 over 256 tokens ----------------------------------------------
# MatMulNBits' accuracy_level says how activations meet the int4 weights.
#  - Level 1 (float activations, onnxruntime's CompFp32): no rounding besides fp32, so the two
#    engines differ by summation order only; the bound (KL <= 1e-3, top-1 >= 99%) is
#    asserted as is, on the tiny models, stories260K and SmolLM2 (measured: KL ~1e-10, 100%).
#  - Level 4 (the default, int8 activations per block): float-rounding differences of ~1e-7
#    upstream become whole int8 steps, and over 30 layers those flips cascade until the rounding of
#    the two runs is independent. onnxruntime's own decode path (M=1) disagrees with its own
#    prefill path by KL 2.2e-3 / top-1 98.0% on SmolLM2 and KL 5.0e-3 / top-1 94.1% on stories260K
#    (onnxruntime 1.32), so at level 4 real models are held to the spec bound or to 1.5x
#    onnxruntime's self-disagreement, whichever is larger, and each MatMulNBits node is checked to
#    ~1e-6 relative on onnxruntime's own inputs (same int8 codes as MLAS). Tiny random models meet
#    the absolute bound at level 4 too.
def _quant_agreement(folder, ids):
    model, ref = NativeModel(folder), OrtRef(folder)
    got = model.session(threads=2).forward(ids, all_logits=True)
    want = ref.forward(ids)
    ref.reset()
    ort_decode = np.concatenate([ref.forward(ids[i:i + 1]) for i in range(len(ids))])
    return _kl_top1(want, got), _kl_top1(want, ort_decode)


def _assert_agreement(native, ort_self):
    (kl, top1), (kl_o, top1_o) = native, ort_self
    assert kl <= max(1e-3, 1.5 * kl_o), (native, ort_self)
    assert top1 >= min(0.99, top1_o - 0.02), (native, ort_self)


def _assert_spec_bound(folder, ids):
    (kl, top1), _ = _quant_agreement(folder, ids)
    assert kl <= 1e-3 and top1 >= 0.99, (kl, top1)


# Tiny models, measured KL: int4 1.4e-7 (an int8 activation tie flips between the engines), int8
# 3e-14, int4 on float activations 2.6e-13 (summation order). Bound: 10x the measured value, at
# least 1e-10 (1000x below one flipped code); the spec bound (1e-3) would hide a real kernel error.
TINY_KL = {"int4": 1.4e-6, "int8": 1e-10, "int4-acc1": 1e-10}


@pytest.mark.parametrize("quant", ["int4", "int8", "int4-acc1"])
def test_quantized_tiny_matches_onnxruntime(tiny_dirs, quant):
    (kl, top1), _ = _quant_agreement(tiny_dirs[quant], _ids(300, 256))
    assert kl <= TINY_KL[quant] and top1 >= 0.99, (kl, top1)


def _matmulnbits_nodes_match_onnxruntime(folder, ids):
    """Every MatMulNBits node: our kernel on onnxruntime's input for that node vs onnxruntime's output."""
    import onnx
    from onnx import helper

    from edgeact.runtime import QMatMul

    from edgeact.converters.onnx_writer import stored_weights

    mp = onnx.load(str(folder / "model.onnx"))
    weights = stored_weights(folder)   # the file's parameters as the graph computes them (fp16 Casts, Div)
    nodes = [n for n in mp.graph.node if n.op_type == "MatMulNBits"]
    names = {x for n in nodes for x in (n.input[0], n.output[0])} - {o.name for o in mp.graph.output}
    mp.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in sorted(names))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(mp.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids[None], "seqlens_k": np.array([len(ids) - 1], np.int32),
             "total_sequence_length": np.array(len(ids), np.int32)}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    outs = [o.name for o in sess.get_outputs()]
    res = dict(zip(outs, sess.run(outs, feeds)))
    for n in nodes:
        w = weights[n.input[1][: -len(".B")]]
        q = QMatMul(w.K, w.N, w.bits, w.block_size, w.B, w.scales, w.zero_points, threads=2)
        want = res[n.output[0]][0]
        got = q(res[n.input[0]][0])
        # same codes as MLAS (127/amax, ties to even): only the fp32 summation order differs;
        # one flipped code would cost ~1e-4 of the row's largest output
        tol = 3e-6 * max(1e-3, float(np.abs(want).max()))
        assert np.abs(got - want).max() <= tol, (n.name, float(np.abs(got - want).max()))


def test_stories_fp32_and_int4_match_onnxruntime(stories_fp32_dir, stories_int4_dir, stories_int4_fp32act_dir):
    model, ref = NativeModel(stories_fp32_dir), OrtRef(stories_fp32_dir)
    assert model.head_dim == 16   # head_dim 8 padded in the graph
    ids = _ids(model.vocab, 256, seed=4)
    assert np.abs(model.session().forward(ids, all_logits=True) - ref.forward(ids)).max() <= 1e-3
    ref.reset()
    assert _greedy(model.session().forward, ids[:5], 30) == _greedy(ref.forward, ids[:5], 30)
    # stories260K's 256-token KL at level 4 swings 10x from one token sequence to the next, for
    # native against onnxruntime and for onnxruntime against itself alike (measured over four
    # sequences: 1e-5 .. 4e-3), so one sequence says little: both sides are averaged over four
    runs = [_quant_agreement(stories_int4_dir, ids if s == 4 else _ids(model.vocab, 256, seed=s)) for s in (4, 5, 6, 7)]
    _assert_agreement(*(tuple(float(np.mean([r[side][k] for r in runs])) for k in (0, 1)) for side in (0, 1)))
    _matmulnbits_nodes_match_onnxruntime(stories_int4_dir, ids)
    _assert_spec_bound(stories_int4_fp32act_dir, ids)


def _smollm2_text_ids(folder, n=256):
    from tokenizers import Tokenizer

    docs = Path(__file__).resolve().parents[1] / "docs" / "steering"
    text = " ".join((docs / f).read_text(encoding="utf-8") for f in ("heldout.txt", "cheerful.txt", "gloomy.txt"))
    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids[:n]
    assert len(ids) == n
    return np.array(ids, np.int64)


@pytest.mark.slow
def test_smollm2_int4_matches_onnxruntime(smollm2_int4_dir):
    ids = _smollm2_text_ids(smollm2_int4_dir)
    _assert_agreement(*_quant_agreement(smollm2_int4_dir, ids))
    # layer 0 sees the RMS-normed Q8_0 embedding, whose exact .5 ties once put 5% of q/k/v off
    _matmulnbits_nodes_match_onnxruntime(smollm2_int4_dir, ids[:64])


@pytest.mark.slow
def test_smollm2_int4_float_activations_meet_the_spec_bound(smollm2_int4_fp32act_dir):
    _assert_spec_bound(smollm2_int4_fp32act_dir, _smollm2_text_ids(smollm2_int4_fp32act_dir))


@pytest.mark.slow
def test_smollm2_fp32_matches_onnxruntime(smollm2_fp32_dir):
    model, ref = NativeModel(smollm2_fp32_dir), OrtRef(smollm2_fp32_dir)
    ids = _smollm2_text_ids(smollm2_fp32_dir, 128)
    assert np.abs(model.session().forward(ids, all_logits=True) - ref.forward(ids)).max() <= 1e-3
    ref.reset()
    assert _greedy(model.session().forward, ids[:20], 20) == _greedy(ref.forward, ids[:20], 20)


# ---- steering and hidden states ------------------------------------------------------------------
def test_steering_matches_onnxruntime_steer_inputs(tiny_dirs):
    folder = tiny_dirs["fp32"]
    model, ref = NativeModel(folder), OrtRef(folder)
    rng = np.random.default_rng(9)
    add = rng.standard_normal(model.hidden).astype(np.float32)
    abl = rng.standard_normal((1, model.hidden))   # R=1: onnxruntime plans its buffers for the initializer's R
    abl = (abl / np.linalg.norm(abl)).astype(np.float32)
    sess = model.session()
    sess.set_steering(1, add=add, ablate=abl)
    ref.steer = {"steer.1.add": add, "steer.1.ablate": abl}
    ids = _ids(model.vocab, 12)
    steered = sess.forward(ids, all_logits=True)
    assert np.abs(steered - ref.forward(ids)).max() <= 1e-3
    sess.reset()
    sess.clear_steering()
    plain = sess.forward(ids, all_logits=True)
    assert np.abs(plain - steered).max() > 1e-2   # the vector did something, and clearing undid it
    ref.steer, _ = {}, ref.reset()
    assert np.abs(plain - ref.forward(ids)).max() <= 1e-3


def test_bad_steering_is_rejected_and_model_keeps_working(tiny_dirs):
    model = NativeModel(tiny_dirs["fp32"])
    sess = model.session()
    ids = _ids(model.vocab, 6)
    before = sess.forward(ids)
    bad = np.zeros(model.hidden, np.float32)
    bad[3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        sess.set_steering(0, add=bad)
    with pytest.raises(ValueError, match="out of range"):
        sess.set_steering(model.n_steer_layers, add=np.zeros(model.hidden))
    with pytest.raises(ValueError, match="last dimension"):
        sess.set_steering(0, add=np.zeros(model.hidden + 1))
    sess.reset()
    assert np.array_equal(sess.forward(ids), before)


def test_hidden_capture_is_the_steer_output(tiny_dirs):
    from edgeact.steering import steer_hidden

    model = NativeModel(tiny_dirs["fp32"])
    sess = model.session(max_chunk=4)
    ids = _ids(model.vocab, 10)
    sess.capture_hidden(True)
    sess.forward(ids)
    plain = sess.hidden_states()
    assert plain.shape == (model.n_layers, 10, model.hidden)
    add = np.full(model.hidden, 0.5, np.float32)
    sess.reset()
    sess.set_steering(model.n_layers - 1, add=add)   # last layer: earlier layers are unchanged
    sess.forward(ids)
    steered = sess.hidden_states()
    np.testing.assert_array_equal(steered[:-1], plain[:-1])
    np.testing.assert_allclose(steered[-1], steer_hidden(plain[-1], add=add), atol=1e-5)
    abl = np.linalg.qr(np.random.default_rng(2).standard_normal((model.hidden, 3)))[0].T.astype(np.float32)
    sess.reset()
    sess.set_steering(model.n_layers - 1, add=add, ablate=abl)   # R = 3 orthonormal directions
    sess.forward(ids)
    np.testing.assert_allclose(sess.hidden_states()[-1], steer_hidden(plain[-1], add=add, ablate=abl), atol=1e-4)


# ---- limits ----------------------------------------------------------------------------------------
def test_context_overflow_and_bad_ids_are_clear_errors(tiny_dirs):
    model = NativeModel(tiny_dirs["int4"])
    sess = model.session(n_ctx=16)
    sess.forward(_ids(model.vocab, 10))
    with pytest.raises(ContextOverflowError, match="context overflow: 10 cached \\+ 7 new tokens exceed .*n_ctx 16"):
        sess.forward(_ids(model.vocab, 7))
    assert sess.n_past == 10   # unchanged, still usable
    with pytest.raises(ValueError, match="token id 300 .* outside the vocabulary"):
        sess.forward([1, 300])
    sess.forward(_ids(model.vocab, 6))
    assert sess.n_past == 16
    with pytest.raises(ValueError, match="exceeds the model's max_context"):
        model.session(n_ctx=model.max_context + 1)




@pytest.fixture(scope="module")
def long_ctx_dir(tmp_path_factory):
    src = random_source("tiny", seed=1, max_position_embeddings=4096)
    return convert(src, tmp_path_factory.mktemp("native-long") / "m", quant="int4", progress=False)


def _rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _recache_in_huge_folios(path):
    """Drops `path` from the page cache and reads it back through a MADV_HUGEPAGE mapping, so the
    cache holds it in 2 MiB folios: what a large model file read from disk ends up in (SmolLM2's
    160 MB data file does; a small test file read plainly does not). Kernels without large
    folios for files read it back in small pages."""
    import mmap

    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            mm.madvise(mmap.MADV_HUGEPAGE)
        for off in range(0, len(mm), 4096):
            mm[off]
        mm.close()
    finally:
        os.close(fd)


def _mapped_resident(name):
    """Bytes of this process's mappings of a file named `name` that are in its page tables."""
    total, page = 0, os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/maps") as maps, open("/proc/self/pagemap", "rb") as pm:
        for line in maps:
            if not line.rstrip().endswith("/" + name):
                continue
            a, b = (int(x, 16) for x in line.split()[0].split("-"))
            pm.seek(a // page * 8)
            entries = np.frombuffer(pm.read((b - a) // page * 8), dtype=np.uint64)
            total += int((entries >> np.uint64(63)).sum()) * page
    return total


def test_2000_decode_steps_stay_within_the_kv_cache(long_ctx_dir):
    model = NativeModel(long_ctx_dir)
    sess = model.session(threads=2, n_ctx=2100)
    out = np.empty(model.vocab, np.float32)
    tok = np.array([5], np.int64)
    sess.forward(tok, out=out)   # first call sizes kernel scratch
    before = _rss_kib()
    for i in range(2000):
        sess.forward(tok, out=out)
        tok[0] = 3 + int(out.argmax()) % (model.vocab - 3)
    grown = _rss_kib() - before
    # the cache is calloc'ed, so its pages arrive as tokens fill it: that is the only allowed growth
    kv_kib = model.n_layers * 2 * model.n_kv_heads * 2100 * model.head_dim * 4 // 1024
    assert grown <= kv_kib + 1024, (grown, kv_kib)
    assert sess.n_past == 2001


def test_resident_memory_is_the_repack_not_the_file(tmp_path):
    """Loaded and decoding, the process holds about the weights once: the SIMD repack of each int4
    matrix replaces its mapped file pages, and the fp16 embedding is resident only where gathered."""
    from edgeact.converters.convert import convert
    from edgeact.converters.random_model import random_source

    src = random_source("tiny", seed=7, vocab_size=8000, hidden_size=512, intermediate_size=1408, num_layers=4,
                        num_heads=8, num_kv_heads=2, head_dim=64)
    folder = convert(src, tmp_path / "m", quant="int4", progress=False)
    meta = json.loads((folder / "edgeact.json").read_text())
    assert meta["external_data"]   # > 16 MiB: aligned external data, mapped in place
    file_bytes = sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx"))
    for f in folder.glob("model.onnx*"):
        _recache_in_huge_folios(f)
    before = _rss_kib()
    model = NativeModel(folder)
    sess = model.session(threads=2, n_ctx=200)
    sess.forward(_ids(8000, 16, seed=9))
    for t in _ids(8000, 8, seed=10):
        sess.forward([t])
    grown = (_rss_kib() - before) * 1024
    kv = model.n_layers * 2 * model.n_kv_heads * 200 * model.head_dim * 4
    # only vectors (norm weights, biases) are copied out of the mapping
    assert model.weight_bytes["copied"] <= 64 * 1024, model.weight_bytes
    # the bound: peak RSS <= 1.15 x (weights + KV); without the page release this is ~2x
    assert grown <= 1.15 * (file_bytes + kv), (grown, file_bytes, kv)
    # A prompt spread over the whole vocabulary leaves the 8 MB fp16 table out of the resident
    # set (a fault maps the large folio around a row; the gather hands the rows back). Measured
    # without that: +8 MB here, +58 MB for SmolLM2's table.
    table = 8000 * 512 * 2
    # Of the mapped data file, only what is read in place stays resident (the rope tables here).
    # A norm weight read in place used to map the 2 MiB folio around it (one PMD entry): 12 MB
    # of the 20 MB file here, 64 MB of SmolLM2's int4 data and scales.
    assert _mapped_resident("model.onnx.data") <= 4 << 20, _mapped_resident("model.onnx.data")
    sess.reset()
    at = _rss_kib()
    sess.forward(np.random.default_rng(11).permutation(8000)[:128], all_logits=False)
    assert (_rss_kib() - at) * 1024 <= table / 4, ((_rss_kib() - at) * 1024, table)


def test_native_engine_matches_ort_engine(tiny_dirs):
    from edgeact.engines import make_engine

    nat, ref = make_engine(tiny_dirs["fp32"], "native", threads=2), make_engine(tiny_dirs["fp32"], "ort", threads=1)
    ids = _ids(300, 9)
    (ln, hn), (lo, ho) = nat.forward(ids, output_hidden=True), ref.forward(ids, output_hidden=True)
    assert np.abs(ln - lo).max() <= 1e-3 and np.abs(hn - ho).max() <= 1e-3
    assert nat.n_past == ref.n_past == 9
    assert np.abs(nat.forward([7]) - ref.forward([7])).max() <= 1e-3
    nat.profile(True)
    nat.forward([8])
    recs = nat.profile_records()
    assert {r["op_type"] for r in recs} >= {"MatMul", "GroupQueryAttention", "SiluMul", "Steer"}
    assert all(r["calls"] == 1 for r in recs) and "GroupQueryAttention" in nat.profile_table()
