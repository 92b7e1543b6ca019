"""Activation sparsity: the Sparsify op against numpy, sparsity 0 is the dense model
exactly, realized sparsity on held-out text tracks the target, native equals
onnxruntime (and its input-sparse GEMV equals its dense path), bad settings fail clearly."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import edgeact
from edgeact.converters.calibration import calibration_ids
from edgeact.converters.convert import convert
from edgeact.converters.model import ConversionError
from edgeact.converters.random_model import random_source
from edgeact.converters.sparsity import calibrate, parse_targets, sparsify_function
from edgeact.engines import native_available
from edgeact.evaluate import compare_logits
from edgeact.sweep import realized_sparsity

METHODS = ("teal", "chess", "wina", "cats")
KL_NATIVE_VS_ORT = {"teal": 1e-10, "chess": 1e-10, "wina": 1e-7, "cats": 1e-10}   # see test_native_matches_onnxruntime


def test_sparsify_function_matches_numpy():
    import onnxruntime as ort

    K = 37
    rng = np.random.default_rng(0)
    thr, col = rng.random(K).astype(np.float32), rng.random(K).astype(np.float32) + 0.5
    node = helper.make_node("Sparsify", ["x", "t", "c"], ["y"], domain="ai.edgeact")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "S", K])],
                          [onnx.numpy_helper.from_array(thr, "t"), onnx.numpy_helper.from_array(col, "c")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("ai.edgeact", 1)],
                          functions=[sparsify_function()], ir_version=10)
    onnx.checker.check_model(m, full_check=True)
    x = rng.standard_normal((1, 5, K)).astype(np.float32)
    y = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
    assert np.array_equal(y, np.where(np.abs(x) * col >= thr, x, 0))


@pytest.fixture(scope="module")
def tiny():
    src = random_source("tiny", seed=2)
    return src, calibration_ids(src, n_tokens=256, seed=99)[0]   # held out: calibration samples seeds 1234+


@pytest.fixture(scope="module")
def folders(tiny, tmp_path_factory):
    src, _ = tiny
    root = tmp_path_factory.mktemp("sparse")
    out = {"dense": convert(src, root / "dense", quant="int4", progress=False)}
    for m in METHODS:
        sp = calibrate(src, m, parse_targets("0.5", m), calib_tokens=512, progress=False)
        out[m] = convert(src, root / m, quant="int4", progress=False, sparsity=sp)
    return out


def test_zero_thresholds_give_the_dense_logits_exactly(tiny, tmp_path):
    src, ids = tiny
    sites = {f"layers.{i}.{s}": (np.zeros(k, np.float32), np.ones(k, np.float32))
             for i in range(src.config.num_layers)
             for s, k in (("attn_in", 48), ("attn_out", 48), ("ffn_in", 48), ("ffn_out", 100))}
    dense = convert(src, tmp_path / "d", quant="int4", progress=False)
    zero = convert(src, tmp_path / "z", quant="int4", progress=False, sparsity={"sites": sites, "meta": {"method": "teal"}})
    engines = ["ort"] + (["native"] if native_available() else [])
    for eng in engines:
        assert np.array_equal(edgeact.load(zero, engine=eng).forward(ids), edgeact.load(dense, engine=eng).forward(ids))


@pytest.mark.parametrize("method", ["teal", "chess", "wina"])
def test_realized_sparsity_on_held_out_text(folders, tiny, method):
    _, ids = tiny
    r = realized_sparsity(folders[method], ids)
    assert len(r) == 8
    assert abs(np.mean(list(r.values())) - 0.5) <= 0.05, r


def test_cats_sparsifies_the_gate_activation(folders, tiny):
    _, ids = tiny
    r = realized_sparsity(folders["cats"], ids)
    assert set(r) == {"layers.0.ffn_act", "layers.1.ffn_act"}
    assert abs(np.mean(list(r.values())) - 0.5) <= 0.05, r


# Targets away from 0.5, different per layer type: at 0.5 a quantile t and 1 - t coincide, and one
# target for both types hides a mix-up of the two.
SPLITS = {m: ["attn=0.3,ffn=0.7", "attn=0.7,ffn=0.3"] for m in ("teal", "chess", "wina")} | \
    {"cats": ["ffn=0.3", "ffn=0.7"], "coreinfer": ["ffn=0.3", "ffn=0.7"]}


def _layer_type(site: str) -> str:
    return "attn" if ".attn_" in site else "ffn"   # attn_in, attn_out | ffn_in, ffn_out, ffn_act (cats)


@pytest.fixture(scope="module")
def calib_ids(tiny):
    return calibration_ids(tiny[0], n_tokens=512)   # the default seeds (1234+): the held-out text is seed 99


@pytest.mark.parametrize("method, spec", [(m, s) for m, specs in SPLITS.items() for s in specs])
def test_realized_sparsity_per_layer_type_at_0_3_and_0_7(tiny, calib_ids, tmp_path, method, spec):
    """Per layer type, the share of zeros on held-out text is the target."""
    src, ids = tiny
    targets = parse_targets(spec, method)
    sp = calibrate(src, method, targets, calib_ids=calib_ids, progress=False)
    folder = convert(src, tmp_path / method, quant="int4", progress=False, sparsity=sp)
    if method == "coreinfer":
        # No thresholds: after the prompt each layer keeps a fixed share of its FFN neurons, on both engines.
        for engine in ["ort"] + (["native"] if native_available() else []):
            eng = edgeact.load(folder, engine=engine).engine
            eng.forward(ids[:64])
            realized = 1.0 - float(eng.core_masks.mean())
            assert abs(realized - targets["ffn"]) <= 0.5 / src.config.intermediate_size + 1e-9, (engine, realized)
        return
    r = realized_sparsity(folder, ids)
    by_type = {}
    for site, v in r.items():
        by_type.setdefault(_layer_type(site), []).append(v)
    assert set(by_type) == set(targets), (by_type, targets)
    # Measured on this model: within 0.051 of the target per type (held-out text, 256 tokens); an
    # inverted quantile or swapped types misses by 0.4.
    for kind, target in targets.items():
        got = float(np.mean(by_type[kind]))
        print(f"{method} {kind}: target {target} realized {got:.4f}")
        assert abs(got - target) <= 0.08, (kind, got, target, r)


@pytest.mark.skipif(not native_available(), reason="native runtime not built")
@pytest.mark.parametrize("method", METHODS)
def test_native_matches_onnxruntime(folders, tiny, method):
    _, ids = tiny
    ref = edgeact.load(folders[method], engine="ort").forward(ids)
    nat = edgeact.load(folders[method], engine="native")
    q = compare_logits(nat.forward(ids), ref, ids)
    # Measured KL: teal, chess, cats 3e-14 (the engines' fp32 summation order), wina 9.4e-9 (a channel
    # whose score sits at its threshold flips between engines). Bound: 10x the measured value, at
    # least 1e-10, which stays 1000x below what one flipped int8 activation code costs (~1e-7);
    # top-1 measured 1.0 over 256 tokens, at most 2 may differ.
    assert q.kl <= KL_NATIVE_VS_ORT[method] and q.top1 >= 0.99, (q.kl, q.top1)
    assert_decode_equals_prefill(nat.engine, ids)


def assert_decode_equals_prefill(eng, ids):
    """Decode runs the input-sparse GEMVs (and CATS's kept up rows); rows 10..39 decoded one at a
    time must equal the same rows of a 40-token prefill (dense on the masked inputs)."""
    eng.reset()
    full = eng.forward(ids[:40])
    eng.reset()
    eng.forward(ids[:10])
    dec = np.concatenate([eng.forward(ids[i:i + 1]) for i in range(10, 40)])
    assert np.abs(dec - full[10:40]).max() <= 1e-4


@pytest.mark.skipif(not native_available(), reason="native runtime not built")
@pytest.mark.parametrize("method", METHODS)
def test_sparse_kernels_equal_the_dense_fallback_bit_for_bit(folders, tiny, method, monkeypatch):
    # Three ways to run decode's GEMVs behind a Sparsify, which must give the same bits:
    # EDGEACT_SPARSE_STATIC (the fixed crossover; the tiny model's widths sit below the sparse
    # kernel's minimum, so the dense kernel on the masked input), EDGEACT_SPARSE_ALWAYS (the
    # input-sparse GEMV, q/k/v and gate/up stacked into one where they share a Sparsify), and
    # the default, which times both paths on the first calls and then mixes them.
    _, ids = tiny

    def decode():
        eng = edgeact.load(folders[method], engine="native").engine
        eng.forward(ids[:10])
        eng.session.profile(True)
        out = np.concatenate([eng.forward(ids[i:i + 1]) for i in range(10, 40)])
        recs = [r for r in eng.session.profile_records() if r["op_type"] == "MatMulNBits" and r["total"] == 0]
        return out, {r["name"]: (r["sparse_calls"], r["calls"]) for r in recs}

    monkeypatch.setenv("EDGEACT_SPARSE_ALWAYS", "1")
    ref, paths = decode()
    sparse_steps = [n for n, (sp, calls) in paths.items() if sp == calls == 30]
    assert sparse_steps, sorted(paths.items())
    if method == "cats":  # up_proj computes only the rows whose gate activation is kept
        assert {n.rsplit(".", 1)[-1] for n in sparse_steps} == {"up_proj", "down_proj"}, sparse_steps
    monkeypatch.delenv("EDGEACT_SPARSE_ALWAYS")
    measured, paths = decode()
    assert np.array_equal(measured, ref)
    # the measured choice explores: each path ran at least 3 times (sparse_tune.h)
    assert all(3 <= paths[n][0] <= 27 for n in sparse_steps), paths
    monkeypatch.setenv("EDGEACT_SPARSE_STATIC", "1")
    static, paths = decode()
    assert np.array_equal(static, ref)
    assert all(paths[n][0] == 0 for n in sparse_steps), paths


@pytest.mark.skipif(not native_available(), reason="native runtime not built")
def test_cats_up_rows_static_rule(tmp_path, monkeypatch):
    # CATS with an FFN wide enough (1024 >= EA_SPARSE_MIN_N) for EDGEACT_SPARSE_STATIC's rows
    # rule: at 70% sparsity up_proj computes only the kept rows on every decode call, and the
    # logits equal those of the always-sparse and the measured runs bit for bit.
    src = random_source("tiny", seed=3, intermediate_size=1024)
    ids = calibration_ids(src, n_tokens=48, seed=98)[0]
    sp = calibrate(src, "cats", parse_targets("0.7", "cats"), calib_tokens=256, progress=False)
    folder = convert(src, tmp_path / "cats", quant="int4", progress=False, sparsity=sp)

    def decode():
        eng = edgeact.load(folder, engine="native").engine
        eng.forward(ids[:8])
        eng.session.profile(True)
        out = np.concatenate([eng.forward(ids[i:i + 1]) for i in range(8, 40)])
        recs = eng.session.profile_records()
        up = [(r["sparse_calls"], r["calls"]) for r in recs if r["name"].endswith("up_proj")]
        return out, up

    monkeypatch.setenv("EDGEACT_SPARSE_STATIC", "1")
    static, up = decode()
    assert up and all(sp == calls == 32 for sp, calls in up), up
    monkeypatch.delenv("EDGEACT_SPARSE_STATIC")
    measured, _ = decode()
    monkeypatch.setenv("EDGEACT_SPARSE_ALWAYS", "1")
    always, _ = decode()
    assert np.array_equal(static, always) and np.array_equal(measured, always)


@pytest.mark.skipif(not native_available(), reason="native runtime not built")
def test_native_reports_realized_sparsity(folders, tiny):
    _, ids = tiny
    eng = edgeact.load(folders["teal"], engine="native").engine
    eng.session.profile(True)
    eng.reset()
    eng.forward(ids[:64])
    recs = [r for r in eng.session.profile_records() if r["op_type"] == "Sparsify"]
    assert len(recs) == 8 and all(r["total"] > 0 for r in recs)
    realized = 1 - sum(r["active"] for r in recs) / sum(r["total"] for r in recs)
    assert abs(realized - 0.5) <= 0.08


@pytest.mark.parametrize("spec, method, message", [
    ("1.0", "teal", "outside"), ("-0.1", "teal", "outside"), ("attn=0.5,mlp=0.2", "teal", "attn or ffn"),
    ("half", "teal", "number"), ("0.5", "magic", "unknown sparsity method"),
])
def test_bad_settings(spec, method, message):
    with pytest.raises(ConversionError, match=message):
        parse_targets(spec, method)


def test_cats_needs_a_gated_ffn():
    src = random_source("tiny", seed=2)
    del src.tensors["model.layers.0.mlp.gate_proj.weight"]
    with pytest.raises(ConversionError, match="gated FFN"):
        calibrate(src, "cats", {"ffn": 0.5}, calib_ids=np.zeros((1, 8), np.int64), progress=False)


def test_cli_convert_with_sparsity(tmp_path, tiny_hf_dir):
    import json

    from edgeact.cli import main

    hf = tiny_hf_dir
    out = tmp_path / "sparse"
    assert main(["convert", str(hf), "-o", str(out), "--sparsity", "attn=0.3,ffn=0.5", "--sparsity-method", "wina",
                 "--calib-tokens", "128", "--quiet"]) == 0
    meta = json.loads((out / "edgeact.json").read_text())
    assert meta["sparsity"]["method"] == "wina" and meta["sparsity"]["targets"] == {"attn": 0.3, "ffn": 0.5}
    assert main(["convert", str(hf), "-o", str(tmp_path / "bad"), "--sparsity", "1.2"]) == 2
    assert not (tmp_path / "bad").exists()


def test_chess_exempts_dominant_channels_and_meets_target():
    import torch

    from edgeact.converters.sparsity import chess_thresholds

    g = torch.Generator().manual_seed(0)
    def acts():
        x = torch.randn(4000, 200, generator=g).abs() * torch.linspace(0.5, 2.0, 200)
        x[:, 7] *= 50.0   # a massive-activation channel
        return x
    calib, held_out = acts(), acts()
    thr = chess_thresholds(calib, 0.5)
    assert thr[7] == 0.0                       # never pruned
    assert (thr[torch.arange(200) != 7] > 0).all()
    assert abs(float((calib < thr).float().mean()) - 0.5) < 2e-3
    assert abs(float((held_out < thr).float().mean()) - 0.5) < 0.02
    # the other channels make up for the exempt one: each is pruned a bit more than half the time
    assert float((calib[:, 0] < thr[0]).float().mean()) > 0.5


def test_realized_sparsity_with_external_data(tiny, tmp_path):
    """Folders with external data (every real model) need the graph saved beside its data."""
    src, ids = tiny
    sp = calibrate(src, "teal", parse_targets("0.5", "teal"), calib_tokens=128, progress=False)
    folder = convert(src, tmp_path / "ext", quant="int4", progress=False, sparsity=sp, external_data=True)
    assert (tmp_path / "ext" / "model.onnx.data").exists()
    r = realized_sparsity(folder, ids)
    assert len(r) == 8 and abs(np.mean(list(r.values())) - 0.5) <= 0.1, r
    assert sorted(p.name for p in (tmp_path / "ext").iterdir() if p.suffix == ".onnx") == ["model.onnx"]


@pytest.mark.skipif(not native_available(), reason="native runtime not built")
def test_bench_reports_realized_sparsity_and_the_sparse_path_share(folders):
    from edgeact.bench import bench_models, format_report

    report = bench_models([folders["dense"], folders["teal"]], engines=("native",), threads=2, pp=8, tg=24,
                          reps=1, measure_bw=False, allow_contended=True, progress=lambda *_: None)
    native = report["models"][1]["engines"]["native"]
    assert set(native["realized_sparsity"]) == {"attn_in", "attn_out", "ffn_in", "ffn_out"}
    assert all(0.05 <= v <= 0.95 for v in native["realized_sparsity"].values()), native["realized_sparsity"]
    # every projection behind a Sparsify has the choice; which path wins is timing, not tested
    assert set(native["sparse_path_share"]) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert all(0.0 <= v <= 1.0 for v in native["sparse_path_share"].values())
    text = format_report(report)
    assert "realized sparsity in native decode" in text and "decode calls on the input-sparse GEMV" in text


@pytest.mark.skipif(not native_available(), reason="native runtime not built")
@pytest.mark.parametrize("method", METHODS)
def test_low_memory_runs_every_row_on_the_channel_major_copy(folders, tiny, method, monkeypatch):
    # low_memory (or EDGEACT_SPARSE_LOWMEM=1) frees the dense repack of every matmul behind a Sparsify: decode is
    # the always-sparse decode bit for bit, prefill rows run the input-sparse GEMV and give the
    # default prefill's bits (the dense GEMM on the masked input), close to onnxruntime's.
    _, ids = tiny

    def run(env, low_memory=False):
        for k in ("EDGEACT_SPARSE_ALWAYS", "EDGEACT_SPARSE_LOWMEM", "EDGEACT_SPARSE_STATIC"):
            monkeypatch.delenv(k, raising=False)
        if env:
            monkeypatch.setenv(env, "1")
        eng = edgeact.load(folders[method], engine="native", low_memory=low_memory).engine
        repacked = eng.session.model.weight_bytes["repacked"]
        prefill = eng.forward(ids[:40])
        eng.reset()
        eng.session.profile(True)
        steps = np.concatenate([eng.forward(ids[i:i + 1]) for i in range(30)])
        recs = [r for r in eng.session.profile_records() if r["op_type"] == "MatMulNBits"]
        return repacked, prefill, steps, {r["name"]: (r["sparse_calls"], r["calls"]) for r in recs}

    # the reference prefill is the dense GEMM's (the fixed rule; a measured load may take the rows)
    repacked, prefill, _, _ = run("EDGEACT_SPARSE_STATIC")
    _, _, always, paths = run("EDGEACT_SPARSE_ALWAYS")
    low_repacked, low_prefill, low_steps, low_paths = run(None, low_memory=True)
    assert run("EDGEACT_SPARSE_LOWMEM")[0] == low_repacked   # the environment variable does the same
    # (CATS's up_proj, which skips output rows, keeps its dense repack and its measured choice)
    sparse_steps = [n for n, (sp, calls) in paths.items() if sp == calls == 30 and not n.endswith("up_proj")]
    assert sparse_steps and all(low_paths[n] == (30, 30) for n in sparse_steps), low_paths
    assert low_repacked < repacked, (low_repacked, repacked)
    assert np.array_equal(low_steps, always)
    assert np.array_equal(low_prefill, prefill)
    # two threads take whole prompt rows each, one thread splits every row's outputs: same bits
    one = edgeact.load(folders[method], engine="native", threads=1, low_memory=True).forward(ids[:40])
    assert np.array_equal(one, low_prefill)
    ref = edgeact.load(folders[method], engine="ort").forward(ids[:40])
    q = compare_logits(low_prefill, ref, ids[:40])
    # measured 2.4e-14 to 3.3e-14 (summation order): the bound of test_native_matches_onnxruntime
    assert q.kl <= KL_NATIVE_VS_ORT[method] and q.top1 >= 0.99, (q.kl, q.top1)


def test_low_memory_is_a_native_option(folders):
    with pytest.raises(ValueError, match="native engine"):
        edgeact.load(folders["teal"], engine="ort", low_memory=True)


@pytest.mark.skipif(not native_available(), reason="native runtime not built")
def test_low_memory_with_interleaved_siblings(tmp_path):
    # With attention biases the writer puts an Add after each of q/k/v_proj, so the stacked group's
    # outputs are not written in place: its first member computes the prompt rows of all three
    # once and each copies its slice
    src = random_source("tiny", seed=4, arch="qwen2", attention_bias=True)
    ids = calibration_ids(src, n_tokens=40, seed=97)[0]
    sp = calibrate(src, "teal", parse_targets("0.5", "teal"), calib_tokens=128, progress=False)
    folder = convert(src, tmp_path / "teal-bias", quant="int4", progress=False, sparsity=sp)
    with pytest.MonkeyPatch.context() as mp:   # the dense GEMM's prefill
        mp.setenv("EDGEACT_SPARSE_STATIC", "1")
        default = edgeact.load(folder, engine="native").forward(ids)
    low = edgeact.load(folder, engine="native", low_memory=True)
    assert np.array_equal(low.forward(ids), default)
    eng = low.engine
    eng.reset()
    eng.session.profile(True)
    eng.forward(ids)
    reads = {r["name"].rsplit(".", 1)[-1]: r["weight_bytes"] for r in eng.session.profile_records()
             if r["name"].startswith("layers.0.attn.") and r["op_type"] == "MatMulNBits"}
    # q_proj read the stacked rows for all three; k and v only copied theirs
    assert reads["q_proj"] > 0 and reads["k_proj"] == reads["v_proj"] == 0, reads


@pytest.mark.skipif(not native_available(), reason="native runtime not built")
def test_prefill_rows_on_the_channel_major_copy_are_measured(folders, tiny, monkeypatch):
    # A prompt chunk behind a Sparsify runs the dense GEMM or, each thread taking whole rows, the
    # input-sparse GEMV on the channel-major copy: the same bits, so the default measures which
    # is faster (EDGEACT_SPARSE_STATIC: the GEMM; EDGEACT_SPARSE_ALWAYS: the rows). The rows show
    # in the profile: q_proj computes k_proj's and v_proj's rows, which then read nothing.
    _, ids = tiny

    def prefills(n):
        eng = edgeact.load(folders["teal"], engine="native", threads=2).engine
        eng.session.profile(True)
        outs, rows = [], []
        for _ in range(n):
            eng.reset()
            eng.session.profile_reset()
            outs.append(eng.forward(ids[:40]))
            recs = {r["name"]: r for r in eng.session.profile_records()}
            rows.append(recs["layers.0.attn.k_proj"]["weight_bytes"] == 0)
        return outs, rows

    monkeypatch.setenv("EDGEACT_SPARSE_STATIC", "1")
    (ref,), rows = prefills(1)
    assert rows == [False]
    monkeypatch.delenv("EDGEACT_SPARSE_STATIC")
    monkeypatch.setenv("EDGEACT_SPARSE_ALWAYS", "1")
    outs, rows = prefills(2)
    assert rows == [True, True] and all(np.array_equal(o, ref) for o in outs)
    monkeypatch.delenv("EDGEACT_SPARSE_ALWAYS")
    outs, rows = prefills(8)
    assert all(np.array_equal(o, ref) for o in outs)
    assert rows.count(True) >= 3 and rows.count(False) >= 3, rows   # the exploration ran both
