"""`edgeact bench` on model folders: the jobs, the probes and the figures derived from them."""
from __future__ import annotations

import statistics
from pathlib import Path

from edgeact.extras import EXTRA_OF, first_missing, install_hint, is_optional

from . import llamabench
from .probes import ROWS_PROBE, folder_facts, load_average, machine, physical_cores, read_bandwidth, \
    rows_read_bandwidth
from .protocol import check_quiet, run_job, run_schedule

# native-lowmem: the native runtime loaded with low_memory (activation-sparse folders keep only
# the channel-major copy: memory against prefill speed). generate: Model.generate on the native
# engine, the user's path. llama.cpp: llama-bench when built, else the Python binding (labelled).
ENGINES = ("native", "native-lowmem", "generate", "ort", "llama.cpp", "llama.cpp-py", "torch")
# the optional modules an engine's runs import; the llama.cpp rows need gguf only to write a GGUF
# that is not cached yet, so theirs is found when that import fails
NEEDS = {"ort": ("onnxruntime",), "torch": ("torch", "transformers")}


def stats(xs: list[float]) -> tuple[float, float]:
    """Median and standard deviation (llama-bench's spread) of the repetitions."""
    if not xs:
        return float("nan"), float("nan")
    return statistics.median(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def ratio(a: list[float], b: list[float], paired: bool) -> float:
    """a over b: the median of the per-repetition ratios when the repetitions were taken in
    turn (drift cancels within a round), else the ratio of the medians."""
    if not a or not b:
        return float("nan")
    if paired and len(a) == len(b):
        return statistics.median(x / y for x, y in zip(a, b))
    return statistics.median(a) / statistics.median(b)


def _llama_job(spec: dict, facts: dict, folder: Path, engine: str, progress) -> dict | str:
    """The spec for a llama.cpp row (llama-bench, or the binding), or why it is skipped."""
    from .subjects import llamacpp_gguf

    exe = llamabench.binary()
    use_binding = engine == "llama.cpp-py" or exe is None
    if use_binding:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            return ("llama-bench not built (edgeact bench --setup-llama-bench) and llama-cpp-python not installed"
                    if engine == "llama.cpp" else "llama-cpp-python not installed")
    elif llamabench.quantize_binary() is None:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            return "llama-quantize missing: run edgeact bench --setup-llama-bench again"
    if (facts["meta"].get("sparsity") or {}).get("method") == "coreinfer":
        return "a CoreInfer folder has no llama.cpp equivalent"
    gguf = llamacpp_gguf(folder, facts["meta"], progress=progress)
    if gguf is None:
        return "source weights not found for the GGUF export"
    spec["gguf"] = str(gguf)
    if use_binding:
        spec["engine"] = "llama.cpp-py"
        spec["label"] = "llama.cpp-py" if engine == "llama.cpp-py" else "llama.cpp-py (fallback: no llama-bench)"
    else:
        spec["llama_bench"] = str(exe)
        spec["label"] = "llama.cpp (llama-bench)"
    return spec


def bench_models(folders: list[Path], *, engines=("native", "ort", "llama.cpp"), threads: int | None = None,
                 pp: int = 128, tg: int = 64, reps: int = 5, measure_bw: bool = True, interleave: bool = True,
                 allow_contended: bool = False, progress=print, run=run_job) -> dict:
    """interleave: every repetition of every engine its own run, alternating (see protocol);
    False runs each engine's repetitions back to back in one process (less loading)."""
    threads = threads or physical_cores()
    load = load_average()
    contended = check_quiet(load, allow_contended)
    report = {"threads": threads, "pp": pp, "tg": tg, "reps": reps, "interleaved": interleave,
              "contended": contended, "machine": machine(threads), "models": []}
    report["machine"]["load_average_at_start"] = list(load)
    if measure_bw:
        report["read_bandwidth_gbs"] = read_bandwidth(threads)
        progress(f"memory read bandwidth ({threads} threads): {report['read_bandwidth_gbs']:.1f} GB/s")
    jobs = []   # (entry, engine, facts, spec)
    missing = {}  # engine: the optional module it needs and this install lacks
    for folder in folders:
        folder = Path(folder)
        facts = folder_facts(folder)
        entry = {"folder": str(folder), "decode_weight_bytes": facts["decode_weight_bytes"],
                 "file_bytes": facts["file_bytes"], "kv_bytes_per_token": facts["kv_bytes_per_token"],
                 "engines": {}, "sparse": bool(facts["meta"].get("sparsity"))}
        report["models"].append(entry)
        for engine in engines:
            spec = {"engine": engine, "label": engine, "folder": str(folder), "threads": threads, "pp": pp, "tg": tg}
            need = first_missing(NEEDS.get(engine, ()))
            if need is None and engine in ("llama.cpp", "llama.cpp-py"):
                try:
                    got = _llama_job(spec, facts, folder, engine, progress)
                except ModuleNotFoundError as e:
                    if not is_optional(e):
                        raise
                    need = e.name
                if need is None and isinstance(got, str):
                    entry["engines"][engine] = {"skipped": got}
                    continue
            if need is not None:
                missing[engine] = need = need.split(".")[0]
                entry["engines"][engine] = {"skipped": f"needs {need}: {install_hint(need)}"}
                continue
            if engine == "torch":
                from edgeact.engines.baselines import source_of

                if source_of(folder, facts["meta"]) is None:
                    entry["engines"][engine] = {"skipped": "source weights not found"}
                    continue
            entry["engines"][engine] = {}   # keeps the table in the order of `engines`
            jobs.append((entry, engine, facts, spec))
    if missing:
        extras = {}
        for engine, module in missing.items():
            extras.setdefault(EXTRA_OF[module], []).append(engine)
        progress("skipped " + "; ".join(f"{', '.join(e)}: they need the {x} extra (pip install \"edgeact[{x}]\")"
                                        for x, e in extras.items()))
    if measure_bw and any(m["sparse"] for m in report["models"]):  # beside the sequential probe, before the runs
        gbs = rows_read_bandwidth(threads)
        if gbs:
            report["rows_read"] = {**ROWS_PROBE, "gbs": gbs}
            progress(f"scattered-row read bandwidth: {gbs:.1f} GB/s")
    results = run_schedule([j[3] for j in jobs], reps, alternate=interleave, run=run, progress=progress)
    for (entry, engine, facts, spec), res in zip(jobs, results):
        res["label"] = spec["label"]
        if "error" not in res:
            for t in ("pp", "tg"):
                res[f"{t}_median"], res[f"{t}_spread"] = stats(res[t])
            if res.get("tg"):
                res["decode_gbs"] = res["tg_median"] * facts["decode_weight_bytes"] / 1e9
                if report.get("read_bandwidth_gbs"):
                    res["bandwidth_share"] = res["decode_gbs"] / report["read_bandwidth_gbs"]
            if res.get("peak_rss"):
                kv = facts["kv_bytes_per_token"] * (pp + tg + 8)
                res["rss_over_weights_kv"] = res["peak_rss"] / (facts["file_bytes"] + kv)
            if res.get("isa") and not report["machine"].get("isa"):
                report["machine"]["isa"] = res["isa"]
        entry["engines"][engine] = res
    _ratios(report, interleave)
    return report


def _ratios(report: dict, paired: bool) -> None:
    dense = None
    ok = lambda base, e: bool(base.get(e, {}).get("tg") or base.get(e, {}).get("pp"))  # noqa: E731
    for entry in report["models"]:
        base = entry["engines"]
        if not entry["sparse"] and dense is None and ok(base, "native"):
            dense = entry
        if entry["sparse"] and dense and ok(base, "native"):
            entry["native_vs_dense"] = {"model": Path(dense["folder"]).name, **{
                t: ratio(base["native"][t], dense["engines"]["native"][t], paired) for t in ("pp", "tg")}}
        for ref in ("ort", "llama.cpp", "llama.cpp-py", "torch"):
            if ok(base, "native") and ok(base, ref):
                entry[f"native_vs_{ref}"] = {t: ratio(base["native"][t], base[ref][t], paired) for t in ("pp", "tg")}
        if ok(base, "generate") and ok(base, "native"):
            entry["generate_vs_native"] = {t: ratio(base["generate"][t], base["native"][t], paired)
                                           for t in ("pp", "tg")}
        if ok(base, "llama.cpp") and ok(base, "llama.cpp-py"):
            entry["llama.cpp-py_vs_llama.cpp"] = {t: ratio(base["llama.cpp-py"][t], base["llama.cpp"][t], paired)
                                                 for t in ("pp", "tg")}
        if entry["sparse"] and ok(base, "native") and ok(base, "native-lowmem"):
            entry["lowmem_vs_native"] = {t: ratio(base["native-lowmem"][t], base["native"][t], paired)
                                         for t in ("pp", "tg")}
