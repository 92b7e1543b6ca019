"""`edgeact bench`'s protocol: each repetition of each engine a process of its own that exits
before the next starts, engines alternating round by round, the sequential fallback, ratios,
the contended-machine guard, llama-bench's JSON, and a failing worker reported, not hung on.
Nothing here times anything: start stamps and the order of events give the schedule."""
import json
import math
import shutil
import sys
from pathlib import Path

import pytest

from edgeact import bench
from edgeact.bench import bench_models, format_report, llamabench, protocol, race
from edgeact.bench import ratio as _ratio
from edgeact.converters.convert import convert
from edgeact.converters.random_model import random_source
from edgeact.engines import native_available

needs_native = pytest.mark.skipif(not native_available(), reason="native runtime not built")
DATA = Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def quiet_machine(monkeypatch):
    """The guard reads the real load average; these tests are about everything else."""
    monkeypatch.setattr(race, "load_average", lambda: (0.0, 0.0, 0.0))


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


@needs_native
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
    assert "engines alternating" in format_report(report)


@needs_native
def test_sequential_runs_each_engine_back_to_back(tiny_folders):
    report = bench_models(list(tiny_folders), engines=("native",), threads=1, pp=4, tg=4, reps=2,
                          measure_bw=False, interleave=False, progress=lambda *_: None)
    (_, _, first), (_, _, second) = _runs(report)
    assert max(first) < min(second)
    assert "back to back" in format_report(report)


@needs_native
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


@needs_native
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


# A stand-in worker with the faults a real one can have.
_FAKE = '''
import json, sys, time
TAG = %r
sys.stdout.write("chatter without a newline"); sys.stdout.write("{not json}\\n")
sys.stdout.write('{"pp": [1]}\\n')   # JSON, but not a tagged reply
mode = sys.argv[1]
if mode == "hang":
    time.sleep(60)
if mode == "die":
    sys.stderr.write("boom: the engine crashed\\n"); sys.exit(3)
print("more chatter", flush=True)
sys.stdout.write(TAG + json.dumps({"pp": [2.0], "tg": [3.0], "rep_at": [0.0], "peak_rss": 5}) + "\\n")
'''


@pytest.mark.parametrize("mode", ["ok", "hang", "die"])
def test_worker_survives_stray_output_and_reports_faults(monkeypatch, mode):
    from edgeact.bench.subjects import REPLY_TAG

    monkeypatch.setattr(protocol, "worker_cmd", lambda spec: [sys.executable, "-c", _FAKE % REPLY_TAG, mode])
    monkeypatch.setattr(protocol, "RUN_TIMEOUT_S", 2.0)
    res = protocol.run_process({})
    if mode == "ok":
        assert res == {"pp": [2.0], "tg": [3.0], "rep_at": [0.0], "peak_rss": 5}
    elif mode == "hang":
        assert res == {"error": "no result in 2 s"}
    else:
        assert res == {"error": "boom: the engine crashed"}


def test_schedule_alternates_and_rotates_the_first_engine():
    order = protocol.schedule(3, 3)
    assert order == [(0, 0, 1), (1, 0, 1), (2, 0, 1), (1, 1, 1), (2, 1, 1), (0, 1, 1), (2, 2, 1), (0, 2, 1), (1, 2, 1)]
    assert protocol.schedule(2, 4, alternate=False) == [(0, 0, 4), (1, 0, 4)]


def test_no_engine_runs_while_another_is_alive(monkeypatch, tmp_path):
    """Every run is a process that has exited before the next starts: each stand-in appends
    'start' and 'end' to a shared log, which must read start, end, start, end ..."""
    log = tmp_path / "log"
    body = ("import sys, json; log = open(sys.argv[1], 'a'); log.write('start\\n'); log.flush(); "
            "import time; time.sleep(0.05); log.write('end\\n'); log.close(); "
            "sys.stdout.write(%r + json.dumps({'pp': [1.0], 'tg': [1.0], 'rep_at': [0.0], 'peak_rss': 1}) + '\\n')")
    from edgeact.bench.subjects import REPLY_TAG

    monkeypatch.setattr(protocol, "worker_cmd", lambda spec: [sys.executable, "-c", body % REPLY_TAG, str(log)])
    specs = [{"engine": e, "label": e, "folder": "m"} for e in ("native", "ort", "generate")]
    res = protocol.run_schedule(specs, 3, progress=lambda *_: None)
    assert log.read_text().split() == ["start", "end"] * 9
    assert all(r["pp"] == [1.0] * 3 for r in res)


def test_schedule_bookkeeping_merges_repetitions_and_stops_a_failed_job():
    calls = []

    def fake(spec):
        calls.append((spec["engine"], spec["reps"], spec["extras"]))
        n = sum(1 for c in calls if c[0] == spec["engine"])
        if spec["engine"] == "bad" and n == 2:
            return {"error": "it broke"}
        return {"pp": [10.0 * n], "tg": [float(n)], "rep_at": [float(len(calls))], "peak_rss": 100 * n,
                **({"isa": "avx2"} if spec["extras"] else {})}

    specs = [{"engine": e, "label": e, "folder": "m"} for e in ("a", "bad", "b")]
    res = protocol.run_schedule(specs, 3, run=fake, progress=lambda *_: None)
    assert res[1] == {"error": "it broke"}
    assert [c for c in calls if c[0] == "bad"] == [("bad", 1, False), ("bad", 1, False)]   # not run a third time
    for r in (res[0], res[2]):
        assert r["pp"] == [10.0, 20.0, 30.0] and r["tg"] == [1.0, 2.0, 3.0]
        assert r["peak_rss"] == 300 and r["isa"] == "avx2"   # the largest process; extras from the last run
    assert [c[2] for c in calls if c[0] == "a"] == [False, False, True]


def test_contended_start_is_refused_or_marked(monkeypatch, tiny_folders):
    monkeypatch.setattr(race, "load_average", lambda: (1.8, 1.2, 0.6))

    def never(spec):
        raise AssertionError("nothing may run on a contended machine without the override")

    with pytest.raises(bench.ContendedError, match="load average 1.80.*--allow-contended"):
        bench_models([tiny_folders[0]], engines=("native",), reps=1, measure_bw=False, run=never,
                     progress=lambda *_: None)
    fake = lambda spec: {"pp": [5.0], "tg": [2.0], "rep_at": [0.0], "peak_rss": 1 << 20}  # noqa: E731
    report = bench_models([tiny_folders[0]], engines=("native",), reps=2, measure_bw=False, run=fake,
                          allow_contended=True, progress=lambda *_: None)
    assert report["contended"] and report["machine"]["load_average_at_start"] == [1.8, 1.2, 0.6]
    assert format_report(report).startswith("CONTENDED")
    monkeypatch.setattr(race, "load_average", lambda: (0.1, 0.9, 1.5))   # the last minute is what counts
    report = bench_models([tiny_folders[0]], engines=("native",), reps=2, measure_bw=False, run=fake,
                          progress=lambda *_: None)
    assert not report["contended"] and "CONTENDED" not in format_report(report)
    for key in ("cpu", "threads", "clock", "simd", "date", "physical_cores"):
        assert key in report["machine"]


def test_contended_cli_says_one_line(monkeypatch, tiny_folders, capsys):
    from edgeact.cli import main

    monkeypatch.setattr(race, "load_average", lambda: (2.5, 2.0, 1.0))
    assert main(["bench", str(tiny_folders[0]), "--engines", "native", "-r", "1", "--no-bandwidth"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "load average 2.50" in err[0]


def test_llama_bench_json_is_parsed_per_repetition():
    text = (DATA / "llama-bench.json").read_text()
    got = llamabench.parse("some log line before the JSON\n" + text)
    rows = json.loads(text)
    pp = next(r for r in rows if r["n_gen"] == 0)
    tg = next(r for r in rows if r["n_prompt"] == 0)
    assert len(got["pp"]) == len(pp["samples_ns"]) >= 2 and got["pp_n"] == pp["n_prompt"]
    assert len(got["tg"]) == len(tg["samples_ns"]) and got["tg_n"] == tg["n_gen"]
    # our per-repetition tokens/s agree with llama-bench's own
    for ours, theirs in ((got["pp"], pp["samples_ts"]), (got["tg"], tg["samples_ts"])):
        assert ours == pytest.approx(theirs, rel=1e-5)
    assert got["info"]["n_threads"] == pp["n_threads"] and got["info"]["build_commit"]
    for bad in ("", "no json here", "[]", "[{\"n_prompt\": 8, \"n_gen\": 8, \"samples_ns\": [1]}]",
                "[{\"n_prompt\": 8, \"n_gen\": 0}]", "[{\"n_prompt\": 8, \"n_gen\": 0, \"samples_ns\": [1]"):
        with pytest.raises(ValueError):
            llamabench.parse(bad)


def test_llama_bench_row_comes_from_its_json(monkeypatch, tiny_folders, tmp_path):
    """The llama.cpp job runs llama-bench with our threads, pp, tg and one repetition per round,
    and the row holds its figures (a stand-in binary replays the recorded output)."""
    fake = tmp_path / "llama-bench"
    argv_log = tmp_path / "argv"
    fake.write_text(f"#!{sys.executable}\nimport sys\nopen({str(argv_log)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
                    f"sys.stdout.write(open({str(DATA / 'llama-bench.json')!r}).read())\n")
    fake.chmod(0o755)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(llamabench, "binary", lambda: fake)
    monkeypatch.setattr(llamabench, "quantize_binary", lambda: fake)
    monkeypatch.setattr("edgeact.bench.subjects.llamacpp_gguf", lambda *a, **k: gguf)
    report = bench_models([tiny_folders[0]], engines=("llama.cpp",), threads=2, pp=8, tg=8, reps=2,
                          measure_bw=False, progress=lambda *_: None)
    row = report["models"][0]["engines"]["llama.cpp"]
    recorded = llamabench.parse((DATA / "llama-bench.json").read_text())
    assert row["label"] == "llama.cpp (llama-bench)"
    assert row["tg"] == recorded["tg"] * 2 and row["pp"] == recorded["pp"] * 2
    calls = argv_log.read_text().splitlines()
    assert len(calls) == 2 and all(c.split() == ["-m", str(gguf), "-t", "2", "-p", "8", "-n", "8", "-r", "1", "-o", "json"]
                                   for c in calls)
    assert row["peak_rss"] > 0   # the child's own, from wait4
    assert "| llama.cpp (llama-bench) |" in format_report(report)


def test_llama_bench_that_hangs_or_fails_is_reported(monkeypatch, tmp_path):
    fake = tmp_path / "llama-bench"
    spec = {"llama_bench": str(fake), "gguf": "m.gguf", "threads": 1, "pp": 8, "tg": 8, "reps": 1}
    fake.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(30)\n")
    fake.chmod(0o755)
    assert protocol.run_llama_bench(spec, timeout=1) == {"error": "llama-bench gave no result in 1 s"}
    fake.write_text(f"#!{sys.executable}\nimport sys\nsys.exit('error: failed to load model')\n")
    assert protocol.run_llama_bench(spec) == {"error": "llama-bench: error: failed to load model"}


@needs_native
def test_bandwidth_probes_default_to_one_thread_per_core_and_reject_bad_settings():
    from edgeact.runtime import measure_read_bandwidth
    from edgeact.runtime.session import lib

    # threads 0 (the default) was passed on as is and the probe answered -1.0
    assert measure_read_bandwidth(nbytes=16 << 20, reps=1) > 0
    assert lib.ea_measure_read_bandwidth(0, 16 << 20, 1) > 0
    for kw in ({"threads": -1}, {"nbytes": 1000}, {"reps": 0}):
        with pytest.raises(ValueError):
            measure_read_bandwidth(**{"nbytes": 16 << 20, "reps": 1, **kw})


@needs_native
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


@needs_native
def test_sparse_folders_get_the_scattered_row_probe(tiny_folders, tmp_path, monkeypatch):
    from edgeact.converters.sparsity import calibrate, parse_targets

    src = random_source("tiny", seed=3)
    sp = calibrate(src, "teal", parse_targets("0.5", "teal"), calib_tokens=64, progress=False)
    sparse = convert(src, tmp_path / "teal", quant="int4", sparsity=sp, progress=False)
    monkeypatch.setattr(race, "read_bandwidth", lambda threads: 30.0)
    monkeypatch.setattr(race, "rows_read_bandwidth", lambda threads: 12.0)
    kw = dict(engines=("native",), threads=1, pp=4, tg=4, reps=1, progress=lambda *_: None)
    dense_only = bench_models([tiny_folders[0]], **kw)
    assert "rows_read" not in dense_only and "scattered" not in format_report(dense_only)
    report = bench_models([tiny_folders[0], sparse], **kw)
    assert report["rows_read"] == {"row_bytes": 1024, "active": 0.5, "gbs": 12.0}
    text = format_report(report)
    assert "12.0 GB/s, 40% of the sequential rate" in text and "takes 1.25× the time of reading every row" in text
    assert "rows_read" not in bench_models([tiny_folders[0], sparse], **kw, measure_bw=False)


@needs_native
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


def test_llama_bench_is_built_from_the_llama_cpp_python_ci_installs():
    """The baseline and the interop tests must be the same llama.cpp: one pinned release."""
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    assert f'"llama-cpp-python=={llamabench.LLAMA_CPP_PYTHON}"' in ci


@needs_native
def test_generate_row_times_the_users_path_beside_the_raw_step(tiny_folders):
    report = bench_models([tiny_folders[0]], engines=("native", "generate"), threads=1, pp=6, tg=5, reps=2,
                          measure_bw=False, progress=lambda *_: None)
    m = report["models"][0]
    gen, raw = m["engines"]["generate"], m["engines"]["native"]
    assert len(gen["pp"]) == len(gen["tg"]) == 2 and all(v > 0 for v in gen["pp"] + gen["tg"])
    assert gen["isa"] == raw["isa"] == report["machine"]["isa"]
    assert set(m["generate_vs_native"]) == {"pp", "tg"}
    assert "| generate ÷ native step |" in format_report(report)


def test_engines_whose_extra_is_missing_are_skipped_in_one_line(monkeypatch, tiny_folders, tmp_path):
    """A device install: the default engines that need the convert extra are skipped, the rest run."""
    from edgeact.bench import subjects

    for module in ("onnxruntime", "gguf"):
        monkeypatch.setitem(sys.modules, module, None)   # import fails as if not installed
    monkeypatch.setattr(subjects, "CACHE", tmp_path)      # no cached GGUF to fall back on
    monkeypatch.setattr(llamabench, "binary", lambda: tmp_path / "llama-bench")
    monkeypatch.setattr(llamabench, "quantize_binary", lambda: tmp_path / "llama-quantize")
    said = []
    fake = lambda spec: {"pp": [5.0], "tg": [2.0], "rep_at": [0.0]}  # noqa: E731
    report = bench_models([tiny_folders[0]], engines=("native", "ort", "llama.cpp"), reps=1, measure_bw=False,
                          run=fake, progress=said.append)
    rows = report["models"][0]["engines"]
    hint = 'pip install "edgeact[convert]"'
    assert rows["ort"] == {"skipped": f"needs onnxruntime: {hint}"}
    assert rows["llama.cpp"] == {"skipped": f"needs gguf: {hint}"}
    assert rows["native"]["pp_median"] == 5.0
    assert [s for s in said if "skipped" in s] == [f"skipped ort, llama.cpp: they need the convert extra ({hint})"]
    assert not list(tmp_path.iterdir())


def test_folder_facts_count_a_shared_embedding_once(tmp_path):
    # A shared table is the lm_head's MatMulNBits weight, read whole every token: nothing
    # is subtracted for it (subtracting a table the file does not hold gave negative GB/s).
    from edgeact.bench.probes import folder_facts
    cfg = {"vocab_size": 1000, "hidden_size": 64, "num_layers": 2, "num_kv_heads": 2, "head_dim": 32}
    (tmp_path / "model.onnx").write_bytes(b"\0" * 1_000_000)
    for kind, expect in (("shared", 1_000_000), ("fp16", 1_000_000 - 1000 * 64 * 2), ("fp32", 1_000_000 - 1000 * 64 * 4)):
        (tmp_path / "edgeact.json").write_text(json.dumps({"config": cfg, "quantization": {"embedding": kind}}))
        assert folder_facts(tmp_path)["decode_weight_bytes"] == expect, kind


@needs_native
def test_shape_build_keeps_json_clean_and_waits_out_its_own_load(monkeypatch, tmp_path, capsys):
    """--json is only the report (the build's messages go to stderr), and a race right after
    building its model waits for the build's load to decay instead of being refused for it."""
    from edgeact.cli import main
    from edgeact.commands import bench as bench_cmd

    monkeypatch.setattr(bench, "CACHE", tmp_path)
    waited = []
    monkeypatch.setattr(bench_cmd, "settle_after_build", lambda: waited.append(True))
    argv = ["bench", "--shape", "tiny", "--engines", "native", "-r", "1", "-p", "4", "-n", "4", "--no-bandwidth",
            "--json"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["models"][0]["folder"].startswith(str(tmp_path))
    assert "building random-weight tiny" in err and waited == [True]
    assert main(argv) == 0                     # cached: nothing built, nothing to wait for
    assert json.loads(capsys.readouterr().out) and waited == [True]
