"""`edgeact bench`: llama-bench-style speed figures, ours against the baselines in one run.

Every engine is measured in its own subprocess (`python -m edgeact.bench --serve`)
so that its peak RSS is its own and one engine's threads or caches do not slow
another. By default all of them stay loaded and take their repetitions in turn
(interleaved), so a drift of the machine hits them alike; `--sequential` runs one
engine at a time (`--worker`), which needs less memory at once. Figures are
tokens/s as median ± spread (half the inter-quartile range is too fragile with
3–5 repetitions, so we report the standard deviation like llama-bench) over
repetitions; speed claims are ratios against the baselines measured in the same
run, because this kind of machine is noisy.
"""
from __future__ import annotations

import json
import os
import queue
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# native-lowmem: the native runtime loaded with low_memory (activation-sparse folders keep only the
# channel-major copy: memory against prefill speed)
ENGINES = ("native", "native-lowmem", "ort", "llama.cpp", "torch")
CACHE = Path(os.environ.get("EDGEACT_HOME", Path.home() / ".cache" / "edgeact")) / "bench"


def physical_cores() -> int:
    """Cores, not hyper-threads (two matmul threads on one core only fight for its SIMD units),
    counted by the native runtime; os.cpu_count() without it."""
    from edgeact import runtime

    return runtime.physical_cores() if runtime.available() else os.cpu_count() or 1


# ---------------------------------------------------------------- machine facts

def read_bandwidth(threads: int, gib: float = 1.0, reps: int = 5) -> float:
    """Memory read bandwidth in GB/s over a buffer far larger than the last-level cache,
    best of `reps` (the machine's capability, not its noise). The native probe streams
    with SIMD loads on a thread pool; numpy's reductions are a slower fallback."""
    try:
        from edgeact.runtime import available, measure_read_bandwidth

        if available():
            return measure_read_bandwidth(threads, int(gib * (1 << 30)), reps)
    except ImportError:
        pass
    a = np.ones(int(gib * (1 << 30)) // 8, dtype=np.int64)
    parts = np.array_split(a, threads)
    best = 0.0
    for _ in range(reps):
        ts = [threading.Thread(target=np.bitwise_or.reduce, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        best = max(best, a.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


# The input-sparse GEMV reads whole channel rows of N/2 bytes (int4), here a TinyLlama-shape
# down_proj's (N = 2048) at 50% active: the narrowest rows a sparse decode streams from memory.
ROWS_PROBE = {"row_bytes": 1024, "active": 0.5}


def rows_read_bandwidth(threads: int, gib: float = 1.0, reps: int = 5) -> float | None:
    """GB/s over a random half of 1 KB rows, read whole (native probe; None without the
    runtime). Runs that short are over before the hardware prefetchers pick them up, so this
    is well below the sequential rate on some CPUs (about half on an AMD EPYC VM), and input
    sparsity saves less there."""
    try:
        from edgeact.runtime import available, measure_rows_read_bandwidth
    except ImportError:
        return None
    if not available():
        return None
    return measure_rows_read_bandwidth(threads, int(gib * (1 << 30)), ROWS_PROBE["row_bytes"], ROWS_PROBE["active"], reps)


# ---------------------------------------------------------------- model facts

def folder_facts(folder: Path) -> dict:
    """Bytes a decode step reads (all weights but the embedding table, of which one
    row is read) and the KV cache size per token of context."""
    meta = json.loads((folder / "edgeact.json").read_text())
    cfg = meta["config"]
    files = [folder / "model.onnx"] + ([folder / "model.onnx.data"] if (folder / "model.onnx.data").exists() else [])
    total = sum(f.stat().st_size for f in files)
    emb_bytes = {"fp32": 4, "fp16": 2}.get(meta.get("quantization", {}).get("embedding", "fp32"), 4)
    embed = cfg["vocab_size"] * cfg["hidden_size"] * emb_bytes
    kv = meta.get("kv_cache") or {"num_kv_heads": cfg["num_kv_heads"], "head_dim": cfg["head_dim"]}
    kv_per_token = 2 * cfg["num_layers"] * kv["num_kv_heads"] * kv["head_dim"] * 4
    return {"file_bytes": total, "decode_weight_bytes": total - embed, "kv_bytes_per_token": kv_per_token,
            "vocab_size": cfg["vocab_size"], "meta": meta}


def source_of(folder: Path, meta: dict):
    """The SourceModel a folder was converted from (for the torch and llama.cpp baselines)."""
    from edgeact.converters.model import ModelConfig

    prov = meta.get("source", {})
    if prov.get("format") == "random":
        from edgeact.converters.random_model import random_source

        return random_source(ModelConfig.from_dict(meta["config"]), seed=prov.get("seed", 0))
    path = prov.get("path")
    if path and Path(path).exists():
        from edgeact.converters.readers import read_source

        return read_source(path)
    return None


def llamacpp_gguf(folder: Path, meta: dict, ftype: str = "q4_0") -> Path | None:
    """Our reader's weights written as GGUF and quantized by llama.cpp itself; cached."""
    key = f"{Path(meta.get('source', {}).get('path', folder.name)).name}-{meta['config']['num_layers']}L-" \
          f"{meta['config']['hidden_size']}-{meta.get('source', {}).get('seed', 0)}"
    out = CACHE / f"{key.replace(':', '_')}.{ftype}.gguf"
    if out.exists():
        return out
    src = source_of(folder, meta)
    if src is None:
        return None
    from edgeact.converters.gguf_export import quantize_gguf, write_gguf

    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        f16 = write_gguf(src, Path(tmp) / "model.f16.gguf", dtype="f16")
        quantize_gguf(f16, Path(tmp) / out.name, ftype)
        os.replace(Path(tmp) / out.name, out)
    return out


# ---------------------------------------------------------------- workers (run in a subprocess)

def _peak_rss() -> int:
    """Peak resident set of this process. VmHWM, not ru_maxrss: the latter survives
    execve, so a worker would inherit its parent's (torch-sized) high-water mark."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def decode_sparsity(eng, tg: int, vocab: int) -> tuple[dict[str, float], dict[str, float]]:
    """Share of zeroed inputs per sparse site type (attn_in, attn_out, ffn_in, ffn_out,
    ffn_act) over `tg` decode steps, from the native profiler's Sparsify and NeuronMask records;
    and per projection behind them (q, k, v, o, gate, up, down), the share of decode calls that
    ran the input-sparse GEMV rather than the dense one on the masked input (the runtime times
    both and takes the faster)."""
    ids = np.random.default_rng(1).integers(3, vocab, size=tg + 1, dtype=np.int64)
    eng.reset()
    eng.forward(ids[:1])
    eng.profile(True)
    eng.profile_reset()
    try:
        for t in ids[1:]:
            eng.forward(np.array([t]))
        recs = eng.profile_records()
    finally:
        eng.profile(False)
        eng.reset()
    agg: dict[str, list[int]] = {}
    paths: dict[str, list[int]] = {}
    for r in recs:
        if r.get("sparse_eligible"):
            kind = r["name"].rsplit(".", 1)[-1].removesuffix("_proj")
            a = paths.setdefault(kind, [0, 0])
            a[0] += r["sparse_calls"]
            a[1] += r["sparse_eligible"]
        if r["op_type"] in ("Sparsify", "NeuronMask") and r["total"]:
            # a CoreInfer NeuronMask zeroes down_proj's input: the ffn_out site
            kind = ("ffn_out" if r["op_type"] == "NeuronMask"
                    else r["name"].rsplit(".sparsify", 1)[0].rsplit(".", 1)[-1])
            a = agg.setdefault(kind, [0, 0])
            a[0] += r["active"]
            a[1] += r["total"]
    return ({k: 1.0 - a / t for k, (a, t) in sorted(agg.items())},
            {k: s / n for k, (s, n) in paths.items()})


class Subject:
    """One engine on one folder, inside a worker process: loaded and warmed up, then timed
    one repetition at a time (pp then tg, as llama-bench), then finished with what needs the
    engine itself (realized sparsity, repack size) and the process's peak RSS."""

    def __init__(self, spec: dict):
        engine, folder, threads = spec["engine"], Path(spec["folder"]), spec["threads"]
        self.pp, self.tg = spec["pp"], spec["tg"]
        facts = folder_facts(folder)
        self.vocab = facts["vocab_size"]
        self.ids = np.random.default_rng(0).integers(3, self.vocab, size=max(self.pp, self.tg) + 1, dtype=np.int64)
        self.extra = lambda: {}
        n_ctx = self.pp + self.tg + 8
        if engine in ("native", "native-lowmem", "ort"):
            from edgeact.engines import make_engine

            # The native KV cache is allocated up front: size it to the run, as llama.cpp's n_ctx is.
            native = {"n_ctx": n_ctx, "low_memory": engine == "native-lowmem"}
            eng = make_engine(folder, "ort" if engine == "ort" else "native", threads=threads,
                              **(native if engine != "ort" else {}))
            last = getattr(eng, "logits_last", None)
            # llama-bench's pp computes logits for the last prompt token only; do the same where we can.
            self.prefill, self.step, self.reset = (last or eng.forward), eng.forward, eng.reset

            def extra():
                res = {}
                if engine == "native" and facts["meta"].get("sparsity") and self.tg:
                    res["realized_sparsity"], res["sparse_path_share"] = decode_sparsity(eng, self.tg, self.vocab)
                try:
                    res["repacked_bytes"] = int(getattr(eng, "repacked_bytes", 0) or 0)
                except Exception:
                    pass
                return res

            self.extra = extra
        elif engine == "llama.cpp":
            import llama_cpp

            model = llama_cpp.Llama(spec["gguf"], n_ctx=n_ctx, n_batch=max(self.pp, 1), n_ubatch=max(self.pp, 1),
                                    n_threads=threads, n_threads_batch=threads, verbose=False)
            self.prefill = self.step = lambda x: model.eval(list(map(int, x)))
            self.reset = model.reset
        elif engine == "torch":
            import torch

            from edgeact.converters.torch_ref import build_torch_model

            torch.set_num_threads(threads)
            tm = build_torch_model(source_of(folder, facts["meta"]))
            state = {}

            @torch.no_grad()
            def forward(x):
                out = tm(torch.from_numpy(np.asarray(x, dtype=np.int64))[None], past_key_values=state.get("past"),
                         use_cache=True)
                state["past"] = out.past_key_values

            self.prefill = self.step = forward
            self.reset = state.clear
        else:
            raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
        # Warm-up: page in weights, size buffers.
        self.reset(); self.prefill(self.ids[:min(self.pp, 16)]); self.step(self.ids[:1]); self.reset()

    def rep(self) -> dict:
        """One repetition: {'pp': t/s or None, 'tg': t/s or None, 'at': wall-clock start}."""
        out = {"pp": None, "tg": None, "at": time.time()}
        if self.pp:
            self.reset()
            t0 = time.perf_counter()
            self.prefill(self.ids[:self.pp])
            out["pp"] = self.pp / (time.perf_counter() - t0)
        if self.tg:
            self.reset()
            self.step(self.ids[:1])
            t0 = time.perf_counter()
            for t in self.ids[1:self.tg + 1]:
                self.step(np.array([t]))
            out["tg"] = self.tg / (time.perf_counter() - t0)
        return out

    def finish(self) -> dict:
        res = self.extra()
        res["peak_rss"] = _peak_rss()
        return res


def _collect(reps: list[dict]) -> dict:
    return {"pp": [r["pp"] for r in reps if r["pp"] is not None],
            "tg": [r["tg"] for r in reps if r["tg"] is not None], "rep_at": [r["at"] for r in reps]}


def worker(spec: dict) -> dict:
    """All repetitions of one engine back to back (--sequential)."""
    s = Subject(spec)
    reps = [s.rep() for _ in range(spec["reps"])]
    return {**_collect(reps), **s.finish()}


REPLY_TAG = "\x1eedgeact-bench "   # marks the worker's replies; any other output is not one
REPLY_TIMEOUT_S = 1800.0            # a worker silent this long is killed and reported
SETTLE_S = 0.1                      # before each repetition: the previous engine's spinning threads settle


def _reply_line(obj) -> str:
    return REPLY_TAG + json.dumps(obj) + "\n"


def _parse_reply(line: str) -> dict | None:
    """The worker's reply in a line of its stdout, or None for any other output."""
    at = line.find(REPLY_TAG)
    if at >= 0:
        try:
            return json.loads(line[at + len(REPLY_TAG):])
        except json.JSONDecodeError:
            pass
    return None


def serve(spec: dict) -> None:
    """Interleaved mode: load, say ready, then one repetition per 'rep' line until 'done'.
    Replies go to a private copy of stdout; whatever else writes to fd 1 (a library, C stdio)
    lands on stderr, so it cannot be taken for a reply nor hold one up."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(obj):
        out.write(_reply_line(obj))
        out.flush()

    s = Subject(spec)
    reply({"ready": True})
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "rep":
            reply(s.rep())
        elif cmd == "done":
            reply(s.finish())
            return


def _worker_cmd(mode: str, spec: dict) -> list[str]:
    return [sys.executable, "-m", "edgeact.bench", mode, json.dumps(spec)]


def _last_error(text: str) -> str:
    return (text.strip().splitlines() or ["worker failed"])[-1]


def run_worker(spec: dict, timeout: float = 1800) -> dict:
    """One engine in a fresh interpreter; errors come back as {'error': ...}."""
    proc = subprocess.run(_worker_cmd("--worker", spec), capture_output=True, text=True, timeout=timeout)
    # split on newlines only: str.splitlines would also cut at the tag's \x1e
    replies = [r for r in map(_parse_reply, proc.stdout.split("\n")) if r is not None]
    if proc.returncode != 0 or not replies:
        return {"error": _last_error(proc.stderr)}
    return replies[-1]


class _Served:
    """A --serve worker: one engine kept loaded in its own process, driven a repetition at a time."""

    def __init__(self, spec: dict):
        self.err = tempfile.TemporaryFile(mode="w+")   # a pipe left unread could fill and block it
        self.proc = subprocess.Popen(_worker_cmd("--serve", spec), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True)
        self.reps: list[dict] = []
        self.error = None
        self.lines = queue.Queue()   # a reader thread, so a silent worker can time out
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self._reply()   # ready, or the error

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _reply(self) -> dict | None:
        while self.error is None:
            try:
                line = self.lines.get(timeout=REPLY_TIMEOUT_S)
            except queue.Empty:
                self.proc.kill()
                self.error = f"no reply in {REPLY_TIMEOUT_S:.0f} s"
                break
            if line is None:   # it exited: the last line of its stderr says why
                self.proc.wait()
                self.err.seek(0)
                self.error = _last_error(self.err.read())
                break
            reply = _parse_reply(line)
            if reply is not None:
                return reply
        return None

    def ask(self, cmd: str) -> dict | None:
        if self.error is not None:
            return None
        try:
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass   # it died; _reply reads why
        return self._reply()

    def close(self) -> None:
        """Ends the process whatever its state (its stdin closed, it exits; killed if it does
        not), then frees the pipes and the stderr file once the reader has seen the end."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=10)
        self.proc.stdout.close()
        self.err.close()

    def result(self) -> dict:
        fin = self.ask("done")
        self.close()
        return {"error": self.error} if fin is None else {**_collect(self.reps), **fin}


def run_interleaved(specs: list[dict], reps: int, progress=print) -> list[dict]:
    """Every engine loaded at once, each in its own process, then repetition r of each in
    turn: a drift of the machine (another tenant, the clock) hits every engine alike, so the
    ratios between them hold better than with each engine's repetitions back to back."""
    served = []
    try:
        for spec in specs:
            progress(f"{Path(spec['folder']).name}: {spec['engine']} (loading) ...")
            served.append(_Served(spec))
        for r in range(reps):
            progress(f"repetition {r + 1}/{reps}")
            for w in served:
                time.sleep(SETTLE_S)
                out = w.ask("rep")
                if out is not None:
                    w.reps.append(out)
        return [w.result() for w in served]
    finally:   # on an exception (or Ctrl-C) no loaded engine is left running
        for w in served:
            if w.proc.poll() is None:
                w.proc.kill()
            if not w.err.closed:
                w.close()


# ---------------------------------------------------------------- the report

@dataclass
class Row:
    model: str
    engine: str
    test: str
    median: float
    spread: float
    extra: dict = field(default_factory=dict)


def _stats(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    return statistics.median(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _ratio(a: list[float], b: list[float], paired: bool) -> float:
    """a over b: the median of the per-repetition ratios when the repetitions were taken in
    turn (drift cancels within a round), else the ratio of the medians."""
    if not a or not b:
        return float("nan")
    if paired and len(a) == len(b):
        return statistics.median(x / y for x, y in zip(a, b))
    return statistics.median(a) / statistics.median(b)


def bench_models(folders: list[Path], *, engines=("native", "ort", "llama.cpp"), threads: int | None = None,
                 pp: int = 128, tg: int = 64, reps: int = 5, measure_bw: bool = True, interleave: bool = True,
                 progress=print) -> dict:
    """interleave: all engines stay loaded (each in its own process) and take their
    repetitions in turn; False runs each engine's repetitions back to back, one process at a
    time (less memory at once, for small devices)."""
    threads = threads or physical_cores()
    report = {"threads": threads, "pp": pp, "tg": tg, "reps": reps, "interleaved": interleave, "models": []}
    from edgeact import runtime

    if runtime.available():
        report["isa"] = runtime.default_isa()   # the native kernel variant the workers load with
    if measure_bw:
        report["read_bandwidth_gbs"] = read_bandwidth(threads)
        progress(f"memory read bandwidth ({threads} threads): {report['read_bandwidth_gbs']:.1f} GB/s")
    jobs = []   # (entry, engine, facts, spec)
    for folder in folders:
        folder = Path(folder)
        facts = folder_facts(folder)
        entry = {"folder": str(folder), "decode_weight_bytes": facts["decode_weight_bytes"],
                 "file_bytes": facts["file_bytes"], "kv_bytes_per_token": facts["kv_bytes_per_token"],
                 "engines": {}, "sparse": bool(facts["meta"].get("sparsity"))}
        report["models"].append(entry)
        for engine in engines:
            spec = {"engine": engine, "folder": str(folder), "threads": threads, "pp": pp, "tg": tg, "reps": reps}
            if engine == "llama.cpp":
                try:
                    import llama_cpp  # noqa: F401
                except ImportError:
                    entry["engines"][engine] = {"skipped": "llama-cpp-python not installed"}
                    continue
                gguf = llamacpp_gguf(folder, facts["meta"])
                if gguf is None:
                    entry["engines"][engine] = {"skipped": "source weights not found for the GGUF export"}
                    continue
                spec["gguf"] = str(gguf)
            if engine == "torch" and source_of(folder, facts["meta"]) is None:
                entry["engines"][engine] = {"skipped": "source weights not found"}
                continue
            entry["engines"][engine] = {}   # keeps the table in the order of `engines`
            jobs.append((entry, engine, facts, spec))
    if measure_bw and any(m["sparse"] for m in report["models"]):  # beside the sequential probe, before the runs
        gbs = rows_read_bandwidth(threads)
        if gbs:
            report["rows_read"] = {**ROWS_PROBE, "gbs": gbs}
            progress(f"scattered-row read bandwidth: {gbs:.1f} GB/s")
    if interleave:
        results = run_interleaved([j[3] for j in jobs], reps, progress)
    else:
        results = []
        for _, engine, _, spec in jobs:
            progress(f"{Path(spec['folder']).name}: {engine} ...")
            results.append(run_worker(spec))
    for (entry, engine, facts, _), res in zip(jobs, results):
        if "error" not in res:
            for t in ("pp", "tg"):
                res[f"{t}_median"], res[f"{t}_spread"] = _stats(res[t])
            if res.get("tg"):
                res["decode_gbs"] = res["tg_median"] * facts["decode_weight_bytes"] / 1e9
                if report.get("read_bandwidth_gbs"):
                    res["bandwidth_share"] = res["decode_gbs"] / report["read_bandwidth_gbs"]
            kv = facts["kv_bytes_per_token"] * (pp + tg + 8)
            res["rss_over_weights_kv"] = res["peak_rss"] / (facts["file_bytes"] + kv)
        entry["engines"][engine] = res
    dense = None
    for entry in report["models"]:
        base = entry["engines"]
        if not entry["sparse"] and dense is None and "tg_median" in base.get("native", {}):
            dense = entry
        if entry["sparse"] and dense and "tg_median" in base.get("native", {}):
            entry["native_vs_dense"] = {"model": Path(dense["folder"]).name, **{
                t: _ratio(base["native"][t], dense["engines"]["native"][t], interleave) for t in ("pp", "tg")}}
        for ref in ("ort", "llama.cpp"):
            if "tg_median" in base.get("native", {}) and "tg_median" in base.get(ref, {}):
                entry[f"native_vs_{ref}"] = {t: _ratio(base["native"][t], base[ref][t], interleave)
                                             for t in ("pp", "tg")}
        if entry["sparse"] and "tg_median" in base.get("native", {}) and "tg_median" in base.get("native-lowmem", {}):
            entry["lowmem_vs_native"] = {t: _ratio(base["native-lowmem"][t], base["native"][t], interleave)
                                         for t in ("pp", "tg")}
    return report


def format_report(report: dict) -> str:
    order = "interleaved" if report.get("interleaved") else "each engine's back to back"
    out = [f"threads={report['threads']}  pp={report['pp']}  tg={report['tg']}  reps={report['reps']} ({order}; "
           "ratios: median of per-repetition ratios when interleaved)"]
    if report.get("isa"):
        out.append(f"native kernels: {report['isa']}")
    if report.get("read_bandwidth_gbs"):
        out.append(f"measured memory read bandwidth: {report['read_bandwidth_gbs']:.1f} GB/s")
    rows = report.get("rows_read")
    if rows and report.get("read_bandwidth_gbs"):
        share = rows["gbs"] / report["read_bandwidth_gbs"]
        out.append(f"scattered reads, a random {100 * rows['active']:.0f}% of {rows['row_bytes']}-byte rows read whole (the "
                   f"input-sparse GEMV's reads of a matrix with {2 * rows['row_bytes']} int4 outputs): {rows['gbs']:.1f} GB/s, "
                   f"{100 * share:.0f}% of the sequential rate; reading that share this way takes "
                   f"{rows['active'] / share:.2f}× the time of reading every row in order")
    out.append("")
    out.append(f"| model | engine | pp{report['pp']} t/s | tg{report['tg']} t/s | decode GB/s (share of bw) | peak RSS MB (÷ weights+KV) |")
    out.append("|---|---|---|---|---|---|")
    for m in report["models"]:
        name = Path(m["folder"]).name
        for eng, r in m["engines"].items():
            if "skipped" in r or "error" in r:
                out.append(f"| {name} | {eng} | {r.get('skipped') or 'error: ' + r['error']} | | | |")
                continue
            bw = f"{r['decode_gbs']:.1f} ({100 * r['bandwidth_share']:.0f}%)" if "bandwidth_share" in r else \
                (f"{r['decode_gbs']:.1f}" if "decode_gbs" in r else "")
            out.append(f"| {name} | {eng} | {r['pp_median']:.1f} ± {r['pp_spread']:.1f} | "
                       f"{r['tg_median']:.1f} ± {r['tg_spread']:.1f} | {bw} | "
                       f"{r['peak_rss'] / 1e6:.0f} ({r['rss_over_weights_kv']:.2f}×) |")
        for ref in ("ort", "llama.cpp", "dense"):
            if f"native_vs_{ref}" in m:
                v = m[f"native_vs_{ref}"]
                label = f"native ÷ {v['model']} (dense)" if ref == "dense" else f"native ÷ {ref}"
                out.append(f"| {name} | {label} | {v['pp']:.2f}× | {v['tg']:.2f}× | | |")
        if "lowmem_vs_native" in m:
            v, lo, na = m["lowmem_vs_native"], m["engines"]["native-lowmem"], m["engines"]["native"]
            out.append(f"| {name} | native-lowmem ÷ native | {v['pp']:.2f}× | {v['tg']:.2f}× | | "
                       f"{lo['peak_rss'] / na['peak_rss']:.2f}× |")
    sparse = [(Path(m["folder"]).name, m["engines"]["native"]["realized_sparsity"]) for m in report["models"]
              if "realized_sparsity" in m["engines"].get("native", {})]
    if sparse:
        out += ["", "realized sparsity in native decode (share of zeroed linear inputs):"]
        out += [f"  {name}: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in sp.items()) for name, sp in sparse]
    paths = [(Path(m["folder"]).name, m["engines"]["native"]["sparse_path_share"]) for m in report["models"]
             if m["engines"].get("native", {}).get("sparse_path_share")]
    if paths:
        out += ["", "decode calls on the input-sparse GEMV (the rest: dense GEMV on the masked input, measured faster):"]
        out += [f"  {name}: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in sp.items()) for name, sp in paths]
    return "\n".join(out)


# ---------------------------------------------------------------- kernels mode

def _ort_matmulnbits_session(mats, K: int, N: int, block: int, threads: int):
    """One onnxruntime session running every weight set once on the same input,
    so its time per matrix includes streaming that matrix from memory."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outs = [], [], []
    for i, qw in enumerate(mats):
        names = [f"B{i}", f"s{i}"] + ([f"z{i}"] if qw.zero_points is not None else [])
        nodes.append(helper.make_node("MatMulNBits", ["x"] + names, [f"y{i}"], domain="com.microsoft",
                                      K=K, N=N, bits=4, block_size=block, accuracy_level=4))
        inits += [numpy_helper.from_array(qw.B, names[0]), numpy_helper.from_array(qw.scales, names[1])]
        if qw.zero_points is not None:
            inits.append(numpy_helper.from_array(qw.zero_points, names[2]))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "k", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory() as d:
        onnx.save_model(model, f"{d}/k.onnx", save_as_external_data=True, location="k.data")
        return ort.InferenceSession(f"{d}/k.onnx", so, providers=["CPUExecutionProvider"])


SETTLE_S = 0.2  # longer than onnxruntime's post-run spin


def bench_kernels(shapes: list[tuple[int, int, int]], *, threads: int | None = None, block: int = 32,
                  reps: int = 7, cycle_bytes: int = 1 << 30, measure_bw: bool = True, progress=print) -> dict:
    """int4 MatMulNBits y = x·Wᵀ: ours against onnxruntime, cycling through
    `cycle_bytes` of distinct weights so neither measures the last-level cache."""
    from edgeact.converters.quantize import quantize_blockwise
    from edgeact.runtime import QMatMul

    threads = threads or physical_cores()
    report = {"threads": threads, "block": block, "reps": reps, "shapes": []}
    if measure_bw:
        report["read_bandwidth_gbs"] = read_bandwidth(threads)
    rng = np.random.default_rng(0)
    for M, K, N in shapes:
        base = quantize_blockwise(rng.standard_normal((N, K), dtype=np.float32) * 0.02, bits=4,
                                  block_size=block, symmetric=True)
        wbytes = base.B.nbytes + base.scales.nbytes
        n_mats = max(2, -(-cycle_bytes // wbytes))
        # Distinct bytes per matrix (a rotated copy), same numeric character.
        mats = [base] + [type(base)(**{**base.__dict__, "B": np.roll(base.B, i, axis=0).copy(),
                                      "scales": np.roll(base.scales, i).copy()}) for i in range(1, n_mats)]
        progress(f"M={M} K={K} N={N}: {n_mats} matrices, {n_mats * wbytes / 1e6:.0f} MB cycled")
        x = rng.standard_normal((M, K), dtype=np.float32)
        kernels = [QMatMul(K, N, 4, block, m.B, m.scales, m.zero_points, threads=threads) for m in mats]
        y = np.empty((M, N), np.float32)

        def ours(x):
            for k in kernels:
                k(x, out=y)
        sess = _ort_matmulnbits_session(mats, K, N, block, threads)
        ours(x)
        sess.run(None, {"x": x})
        t_ours, t_ort = [], []
        for _ in range(reps):
            # Each timing starts after the other engine's pool has gone idle:
            # onnxruntime's workers spin >10 ms after a run and, on 2 cores,
            # steal the cores our threads need (0.77x instead of 1.35x).
            time.sleep(SETTLE_S)
            t0 = time.perf_counter(); ours(x); t_ours.append((time.perf_counter() - t0) / n_mats)
            time.sleep(SETTLE_S)
            t0 = time.perf_counter(); sess.run(None, {"x": x}); t_ort.append((time.perf_counter() - t0) / n_mats)
        mo, so_ = _stats(t_ours)
        mr, sr = _stats(t_ort)
        # each engine's GB/s counts the bytes it reads: ours its repack (fp16 scales when exact), onnxruntime the file's
        ours_bytes = kernels[0].bytes
        row = {"M": M, "K": K, "N": N, "weight_bytes": wbytes, "ours_weight_bytes": ours_bytes,
               "ours_us": mo * 1e6, "ours_us_spread": so_ * 1e6,
               "ort_us": mr * 1e6, "ort_us_spread": sr * 1e6, "speedup": mr / mo,
               "ours_gbs": ours_bytes / mo / 1e9, "ort_gbs": wbytes / mr / 1e9}
        if report.get("read_bandwidth_gbs"):
            row["ours_bw_share"] = row["ours_gbs"] / report["read_bandwidth_gbs"]
        report["shapes"].append(row)
        del sess, kernels
    return report


def format_kernels(report: dict) -> str:
    out = [f"int4 block {report['block']}, threads={report['threads']}, reps={report['reps']}"]
    if report.get("read_bandwidth_gbs"):
        out.append(f"measured memory read bandwidth: {report['read_bandwidth_gbs']:.1f} GB/s")
    out += ["", "| M | K | N | ours µs | onnxruntime µs | speed-up | ours GB/s (share of bw) |", "|---|---|---|---|---|---|---|"]
    for r in report["shapes"]:
        share = f" ({100 * r['ours_bw_share']:.0f}%)" if "ours_bw_share" in r else ""
        out.append(f"| {r['M']} | {r['K']} | {r['N']} | {r['ours_us']:.0f} ± {r['ours_us_spread']:.0f} | "
                   f"{r['ort_us']:.0f} ± {r['ort_us_spread']:.0f} | {r['speedup']:.2f}× | {r['ours_gbs']:.1f}{share} |")
    return "\n".join(out)


if __name__ == "__main__":  # worker entry: python -m edgeact.bench --worker|--serve '{json}'
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.stdout.write(_reply_line(worker(json.loads(sys.argv[2]))))
    elif len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(json.loads(sys.argv[2]))
    else:
        sys.exit("usage: python -m edgeact.bench --worker|--serve SPEC_JSON (use `edgeact bench` instead)")
