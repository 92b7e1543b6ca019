"""`edgeact bench`'s scheduling: interleaved repetitions (every engine loaded, one repetition
of each in turn), the sequential fallback, ratios, and a failing worker reported, not hung on.
Nothing here times anything: the repetitions' wall-clock start stamps give their order."""
import math
import shutil
import sys

import pytest

from edgeact import bench
from edgeact.bench import _ratio, bench_models, format_report
from edgeact.converters.convert import convert
from edgeact.converters.random_model import random_source
from edgeact.engines import native_available

pytestmark = pytest.mark.skipif(not native_available(), reason="native runtime not built")


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    src = random_source("tiny", seed=3)
    a = convert(src, root / "a", quant="int4", progress=False)
    b = convert(src, root / "b", quant="int8", progress=False)
    return a, b


def _runs(report):
    """(model, engine, [start stamps]) of every engine that ran."""
    return [(m["folder"], e, r["rep_at"]) for m in report["models"] for e, r in m["engines"].items() if "rep_at" in r]


def test_interleaved_repetitions_take_turns(tiny_folders):
    report = bench_models(list(tiny_folders), engines=("native", "ort"), threads=1, pp=4, tg=4, reps=3,
                          measure_bw=False, progress=lambda *_: None)
    runs = _runs(report)
    assert len(runs) == 4 and all(len(at) == 3 for _, _, at in runs)
    for r in range(2):   # every engine's repetition r starts before any engine's r + 1
        assert max(at[r] for _, _, at in runs) < min(at[r + 1] for _, _, at in runs)
    for m in report["models"]:
        for res in m["engines"].values():
            assert len(res["tg"]) == 3 and len(res["pp"]) == 3 and res["peak_rss"] > 0
    assert "(interleaved;" in format_report(report)


def test_sequential_runs_each_engine_back_to_back(tiny_folders):
    report = bench_models(list(tiny_folders), engines=("native",), threads=1, pp=4, tg=4, reps=2,
                          measure_bw=False, interleave=False, progress=lambda *_: None)
    (_, _, first), (_, _, second) = _runs(report)
    assert max(first) < min(second)
    assert "back to back" in format_report(report)


def test_a_failing_worker_is_reported_and_the_others_still_run(tiny_folders, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_folders[0], bad)
    (bad / "model.onnx").write_bytes(b"\x08\x07 not a protobuf model")
    report = bench_models([tiny_folders[0], bad, tiny_folders[1]], engines=("native",), threads=1, pp=4, tg=4,
                          reps=2, measure_bw=False, progress=lambda *_: None)
    good0, broken, good1 = (m["engines"]["native"] for m in report["models"])
    assert "error" in broken and broken["error"]
    assert len(good0["tg"]) == 2 and len(good1["tg"]) == 2


def test_ratio_pairs_repetitions_only_when_interleaved():
    a, b = [2.0, 9.0, 3.0], [1.0, 3.0, 3.0]
    assert _ratio(a, b, paired=True) == 2.0               # median of 2, 3, 1
    assert _ratio(a, b, paired=False) == 3.0 / 3.0        # median over median
    assert math.isnan(_ratio([], b, paired=True))


def test_sweep_reports_quality_and_interleaved_speed(tmp_path):
    from edgeact.sweep import format_table, plot, sweep

    rows = sweep(random_source("tiny", seed=3), ["teal"], [0.5], tmp_path / "sw", n_tokens=64,
                 progress=lambda *_: None)
    assert [(r["method"], r["target"]) for r in rows] == [("dense", 0.0), ("teal", 0.5)]
    dense, teal = rows
    assert dense["realized"] == 0.0 and 0.3 <= teal["realized"] <= 0.7, teal
    assert teal["kl"] > dense["kl"] >= 0.0
    assert all(r["tg"] > 0 for r in rows) and dense["speedup"] == 1.0 and teal["speedup"] > 0
    assert "| teal | 0.50 |" in format_table(rows)
    plot(rows, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000


# A stand-in worker speaking the --serve protocol, with the faults a real one can have.
_FAKE = """
import json, sys, time
TAG = %r
def reply(o):
    sys.stdout.write(TAG + json.dumps(o) + "\\n"); sys.stdout.flush()
sys.stdout.write("chatter without a newline"); sys.stdout.write("{not json}\\n")
sys.stdout.write('{"pp": 1}\\n')   # JSON, but not a tagged reply
reply({"ready": True})
mode = sys.argv[1]
for line in sys.stdin:
    if line.strip() == "rep":
        if mode == "hang":
            time.sleep(60)
        if mode == "die":
            sys.stderr.write("boom: the engine crashed\\n"); sys.exit(3)
        print("more chatter", flush=True)
        reply({"pp": 2.0, "tg": 3.0, "at": 0.0})
    elif line.strip() == "done":
        reply({"peak_rss": 5}); break
"""


@pytest.mark.parametrize("mode", ["ok", "hang", "die"])
def test_served_worker_survives_stray_output_and_reports_faults(monkeypatch, mode):
    monkeypatch.setattr(bench, "_worker_cmd", lambda *_: [sys.executable, "-c", _FAKE % bench.REPLY_TAG, mode])
    monkeypatch.setattr(bench, "REPLY_TIMEOUT_S", 2.0)
    w = bench._Served({})
    assert w.error is None
    out = w.ask("rep")
    if out is not None:
        w.reps.append(out)
    res = w.result()
    assert w.proc.poll() is not None and w.err.closed
    if mode == "ok":
        assert res == {"pp": [2.0], "tg": [3.0], "rep_at": [0.0], "peak_rss": 5}
    elif mode == "hang":
        assert res == {"error": "no reply in 2 s"}
    else:
        assert res == {"error": "boom: the engine crashed"}


def test_bandwidth_probes_default_to_one_thread_per_core_and_reject_bad_settings():
    from edgeact.runtime import measure_read_bandwidth
    from edgeact.runtime.session import lib

    # threads 0 (the default) was passed on as is and the probe answered -1.0
    assert measure_read_bandwidth(nbytes=16 << 20, reps=1) > 0
    assert lib.ea_measure_read_bandwidth(0, 16 << 20, 1) > 0
    for kw in ({"threads": -1}, {"nbytes": 1000}, {"reps": 0}):
        with pytest.raises(ValueError):
            measure_read_bandwidth(**{"nbytes": 16 << 20, "reps": 1, **kw})


def test_rows_probe_reads_rows_and_rejects_bad_settings():
    from edgeact.runtime import measure_rows_read_bandwidth
    from edgeact.runtime.session import lib

    for active in (0.5, 1.0):
        gbs = measure_rows_read_bandwidth(1, 16 << 20, 1024, active, 1)
        assert math.isfinite(gbs) and gbs > 0
    assert measure_rows_read_bandwidth(0, 16 << 20, 1024, 0.5, 1) > 0
    for kw in ({"row_bytes": 100}, {"row_bytes": 0}, {"active": 0.0}, {"active": 1.5}, {"threads": -1},
               {"nbytes": 1000}, {"row_bytes": 2 << 20, "nbytes": 16 << 20}):
        with pytest.raises(ValueError):
            measure_rows_read_bandwidth(**{"threads": 1, "nbytes": 16 << 20, "reps": 1, **kw})
    # the native probe checks on its own too (it is public C API)
    assert lib.ea_measure_rows_read_bandwidth(1, 16 << 20, 100, 0.5, 1) < 0
    assert lib.ea_measure_rows_read_bandwidth(1, 16 << 20, 1024, float("nan"), 1) < 0
    assert lib.ea_measure_rows_read_bandwidth(-1, 16 << 20, 1024, 0.5, 1) < 0


def test_sparse_folders_get_the_scattered_row_probe(tiny_folders, tmp_path, monkeypatch):
    from edgeact.converters.sparsity import calibrate, parse_targets

    src = random_source("tiny", seed=3)
    sp = calibrate(src, "teal", parse_targets("0.5", "teal"), calib_tokens=64, progress=False)
    sparse = convert(src, tmp_path / "teal", quant="int4", sparsity=sp, progress=False)
    monkeypatch.setattr(bench, "read_bandwidth", lambda threads: 30.0)
    monkeypatch.setattr(bench, "rows_read_bandwidth", lambda threads: 12.0)
    kw = dict(engines=("native",), threads=1, pp=4, tg=4, reps=1, progress=lambda *_: None)
    dense_only = bench_models([tiny_folders[0]], **kw)
    assert "rows_read" not in dense_only and "scattered" not in format_report(dense_only)
    report = bench_models([tiny_folders[0], sparse], **kw)
    assert report["rows_read"] == {"row_bytes": 1024, "active": 0.5, "gbs": 12.0}
    text = format_report(report)
    assert "12.0 GB/s, 40% of the sequential rate" in text and "takes 1.25× the time of reading every row" in text
    assert "rows_read" not in bench_models([tiny_folders[0], sparse], **kw, measure_bw=False)


def test_native_lowmem_engine_is_compared_with_native_on_sparse_folders(tiny_folders, tmp_path):
    from edgeact.converters.sparsity import calibrate, parse_targets

    src = random_source("tiny", seed=3)
    sp = calibrate(src, "teal", parse_targets("0.5", "teal"), calib_tokens=64, progress=False)
    sparse = convert(src, tmp_path / "teal", quant="int4", sparsity=sp, progress=False)
    report = bench_models([tiny_folders[0], sparse], engines=("native", "native-lowmem"), threads=1, pp=4, tg=4,
                          reps=2, measure_bw=False, progress=lambda *_: None)
    dense, teal = report["models"]
    # the low-memory load frees the dense repack of the sparse matmuls only
    assert dense["engines"]["native-lowmem"]["repacked_bytes"] == dense["engines"]["native"]["repacked_bytes"]
    assert teal["engines"]["native-lowmem"]["repacked_bytes"] < teal["engines"]["native"]["repacked_bytes"]
    assert "lowmem_vs_native" in teal and "lowmem_vs_native" not in dense
    assert "| teal | native-lowmem ÷ native |" in format_report(report)
