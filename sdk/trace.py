"""Where a token's time goes: a Chrome/Perfetto trace of every op of every forward call, and the
per-op table and chart of `edgeact profile`, from the native runtime's profiler.

The profiler times each graph node on the thread that runs the graph (a node's worker threads
work inside that span), so the trace has one track for the forward calls (prefill, then one per
generated token) and one for the ops; ops sit back to back from the start of their call, each
as long as the profiler measured (the gaps between ops, a few microseconds, are left out).
A MatMulNBits that ran the input-sparse kernel is marked path "sparse", others "dense".
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

PID = 1
TID_CALLS, TID_OPS = 1, 2


def _need_native(model):
    if getattr(model.engine, "name", None) != "native":
        raise ValueError("tracing needs the native engine's profiler (--engine native); onnxruntime has its own "
                         "(SessionOptions.enable_profiling)")


class Tracer:
    """Collects one event per op per forward call while installed on a model's native engine."""

    def __init__(self, model):
        _need_native(model)
        self.model = model
        self.events: list[dict] = []
        self.steps: list[dict] = []   # per forward call: tokens, wall ns, per-op records
        self._t0 = time.perf_counter_ns()

    @contextmanager
    def recording(self):
        eng = self.model.engine
        inner = eng.forward

        def forward(ids, *a, **kw):
            eng.profile_reset()
            start = time.perf_counter_ns()
            out = inner(ids, *a, **kw)
            end = time.perf_counter_ns()
            self._record(np.asarray(ids).size, start, end, eng.profile_records())
            return out

        eng.profile(True)
        eng.forward = forward  # instance attribute: the generation loop's calls go through it
        try:
            yield self
        finally:
            del eng.forward
            eng.profile(False)

    def _record(self, n_tokens: int, start: int, end: int, records: list[dict]) -> None:
        i = len(self.steps)
        kind = "prefill" if i == 0 or n_tokens > 1 else "decode"
        name = f"prefill ({n_tokens} tokens)" if kind == "prefill" else f"token {i}"
        ts = (start - self._t0) / 1e3
        self.events.append({"name": name, "cat": kind, "ph": "X", "ts": ts, "dur": (end - start) / 1e3,
                            "pid": PID, "tid": TID_CALLS, "args": {"tokens": n_tokens, "step": i}})
        at = ts
        ran = [r for r in records if r["calls"]]
        for r in ran:
            dur = r["ns"] / 1e3
            args = {"op_type": r["op_type"], "step": i, "weight_bytes": r["weight_bytes"]}
            if r["op_type"] == "MatMulNBits":
                args["path"] = "sparse" if r["sparse_calls"] else "dense"
            if r["total"]:
                args["active_share"] = round(r["active"] / r["total"], 4)
            self.events.append({"name": r["name"], "cat": r["op_type"], "ph": "X", "ts": at, "dur": dur,
                                "pid": PID, "tid": TID_OPS, "args": args})
            at += dur
        self.steps.append({"kind": kind, "tokens": n_tokens, "wall_ns": end - start, "records": ran})

    def chrome_trace(self) -> dict:
        meta = [{"name": "process_name", "ph": "M", "pid": PID, "args": {"name": f"edgeact {self.model.folder.name}"}},
                {"name": "thread_name", "ph": "M", "pid": PID, "tid": TID_CALLS, "args": {"name": "forward calls"}},
                {"name": "thread_name", "ph": "M", "pid": PID, "tid": TID_OPS, "args": {"name": "ops"}}]
        eng = self.model.engine
        return {"traceEvents": meta + self.events, "displayTimeUnit": "ms",
                "otherData": {"model": str(self.model.folder), "isa": eng.isa, "threads": eng.threads}}

    def save(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.chrome_trace()))
        return path


def trace_pp_tg(folder, pp: int, tg: int, threads: int | None, path) -> Tracer:
    """bench --trace: one traced run of a pp-token prompt and tg greedy tokens (outside the timed
    runs, so the profiler's own cost never enters the benchmark's numbers)."""
    import edgeact

    model = edgeact.load(folder, engine="native", threads=threads)
    eng = model.engine
    rng = np.random.default_rng(0)
    ids = rng.integers(0, eng.vocab_size, size=max(pp, 1))
    tracer = Tracer(model)
    eng.reset()
    with tracer.recording():
        logits = eng.forward(ids)[-1]
        for _ in range(max(tg - 1, 0)):
            logits = eng.forward(np.array([int(np.argmax(logits))]))[-1]
    tracer.save(path)
    return tracer


def op_summary(steps: list[dict], bandwidth_gbs: float | None = None) -> list[dict]:
    """Per op type over decode steps: ms per token, share of the token, weight GB/s and, given the
    machine's read bandwidth, the share of that roofline the op reaches."""
    decode = [s for s in steps if s["kind"] == "decode"] or steps
    n = len(decode)
    agg: dict[str, dict] = {}
    for s in decode:
        for r in s["records"]:
            a = agg.setdefault(r["op_type"], {"op": r["op_type"], "ns": 0, "weight_bytes": 0, "nodes": set()})
            a["ns"] += r["ns"]
            a["weight_bytes"] += r["weight_bytes"]
            a["nodes"].add(r["name"])
    total = sum(a["ns"] for a in agg.values()) or 1
    wall = sum(s["wall_ns"] for s in decode) / max(n, 1)
    rows = []
    for a in sorted(agg.values(), key=lambda a: -a["ns"]):
        gbs = a["weight_bytes"] / a["ns"] if a["ns"] else 0.0
        rows.append({"op": a["op"], "nodes": len(a["nodes"]), "ms_per_token": a["ns"] / n / 1e6,
                     "share": a["ns"] / total, "weight_gbs": gbs,
                     "roofline_share": gbs / bandwidth_gbs if bandwidth_gbs and a["weight_bytes"] else None})
    return [dict(r, wall_ms_per_token=wall / 1e6) for r in rows]


def format_summary(rows: list[dict]) -> str:
    lines = [f"{'op':<22}{'nodes':>6}{'ms/token':>10}{'%':>7}{'GB/s':>8}{'roofline':>10}"]
    for r in rows:
        roof = f"{100 * r['roofline_share']:>9.0f}%" if r["roofline_share"] is not None else f"{'-':>10}"
        lines.append(f"{r['op']:<22}{r['nodes']:>6}{r['ms_per_token']:>10.3f}{100 * r['share']:>7.1f}"
                     f"{r['weight_gbs']:>8.2f}{roof}")
    if rows:
        ops = sum(r["ms_per_token"] for r in rows)
        lines.append(f"ops {ops:.3f} ms of a {rows[0]['wall_ms_per_token']:.3f} ms token")
    return "\n".join(lines)


def plot_summary(rows: list[dict], path, title: str, bandwidth_gbs: float | None) -> Path:
    """Bar chart: ms per token by op type, beside the share of the read-bandwidth roofline reached."""
    from edgeact.extras import require

    require("matplotlib", "the profile chart")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [r["op"] for r in rows][::-1]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 0.45 * len(ops) + 1.8), sharey=True)
    a.barh(ops, [r["ms_per_token"] for r in rows][::-1], color="#4477aa")
    a.set_xlabel("ms per generated token")
    a.set_title("where a token's time goes")
    roof = [100 * (r["roofline_share"] or 0) for r in rows][::-1]
    b.barh(ops, roof, color="#ee7733")
    b.set_xlim(0, max(100, max(roof, default=0) * 1.1))
    b.axvline(100, color="grey", lw=0.8, ls="--")
    b.set_xlabel(f"% of read bandwidth ({bandwidth_gbs:.1f} GB/s)" if bandwidth_gbs else "% of read bandwidth")
    b.set_title("weight bytes / time vs the roofline")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
