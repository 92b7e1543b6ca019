"""The Chrome trace of `run --trace` and the table/chart of `edgeact profile` (native profiler)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgeact.engines import native_available

pytestmark = pytest.mark.skipif(not native_available(), reason="native runtime not built")


def _check_chrome_trace(doc: dict) -> list[dict]:
    """The Trace Event Format's JSON object form: the fields each event kind must carry."""
    assert set(doc) >= {"traceEvents"} and isinstance(doc["traceEvents"], list)
    for e in doc["traceEvents"]:
        assert isinstance(e["name"], str) and e["ph"] in ("X", "M")
        assert isinstance(e["pid"], int)
        if e["ph"] == "X":
            assert isinstance(e["tid"], int) and isinstance(e["cat"], str)
            assert isinstance(e["ts"], float) and isinstance(e["dur"], float) and e["ts"] >= 0 and e["dur"] >= 0
            assert isinstance(e.get("args", {}), dict)
        else:
            assert e["name"] in ("process_name", "thread_name") and isinstance(e["args"]["name"], str)
    return [e for e in doc["traceEvents"] if e["ph"] == "X"]


def test_trace_has_one_event_per_op_per_token(stories_fp32_dir, tmp_path):
    import edgeact
    from edgeact.trace import Tracer

    model = edgeact.load(stories_fp32_dir, engine="native", threads=1)
    # the nodes one decode token executes, counted with the profiler directly
    eng = model.engine
    eng.profile(True)
    eng.forward(np.array([1, 5, 9]))
    eng.profile_reset()
    eng.forward(np.array([7]))
    per_token = [r["name"] for r in eng.profile_records() if r["calls"]]
    eng.profile(False)

    tracer = Tracer(model)
    with tracer.recording():
        res = model.generate([1, 5, 9, 30], max_new_tokens=6)
    assert "forward" not in vars(eng)  # the engine is itself again
    path = tracer.save(tmp_path / "t.json")
    events = _check_chrome_trace(json.loads(path.read_text()))
    calls = [e for e in events if e["tid"] == 1]
    ops = [e for e in events if e["tid"] == 2]
    # a prefill call, then one per generated token but the last (its logits are never needed)
    assert [c["cat"] for c in calls] == ["prefill"] + ["decode"] * (len(res.ids) - 1)
    for step, call in enumerate(calls):
        mine = [e for e in ops if e["args"]["step"] == step]
        assert [e["name"] for e in mine] == per_token
        assert all(call["ts"] <= e["ts"] and e["ts"] + e["dur"] <= call["ts"] + call["dur"] + 1e-3 for e in mine)
        assert all(e["args"]["path"] in ("sparse", "dense") for e in mine if e["cat"] == "MatMulNBits")


def test_trace_needs_the_native_engine(stories_fp32_dir):
    import edgeact
    from edgeact.trace import Tracer

    with pytest.raises(ValueError, match="native"):
        Tracer(edgeact.load(stories_fp32_dir, engine="ort"))


def test_cli_trace_and_profile(stories_fp32_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from edgeact.cli import main

    out = tmp_path / "run.json"
    assert main(["run", str(stories_fp32_dir), "-p", "1,5,9", "-n", "4", "--trace", str(out), "--threads", "1"]) == 0
    _check_chrome_trace(json.loads(out.read_text()))
    png = tmp_path / "p.png"
    assert main(["profile", str(stories_fp32_dir), "-p", "1,5,9", "-n", "4", "--threads", "1", "-o", str(png),
                 "--bandwidth", "10"]) == 0
    text = capsys.readouterr().out
    assert "MatMul" in text and "roofline" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_trace(stories_fp32_dir, tmp_path):
    from edgeact.trace import trace_pp_tg

    tracer = trace_pp_tg(stories_fp32_dir, pp=8, tg=3, threads=1, path=tmp_path / "b.json")
    events = _check_chrome_trace(json.loads((tmp_path / "b.json").read_text()))
    calls = [e for e in events if e["tid"] == 1]
    assert [c["cat"] for c in calls] == ["prefill", "decode", "decode"]
    assert calls[0]["args"]["tokens"] == 8 and len(tracer.steps) == 3
