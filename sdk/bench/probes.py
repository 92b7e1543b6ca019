"""What the machine and the model are, measured or read in the same run as the figures:
memory read bandwidth, CPU model, kernel set, clock, load average; a folder's decode bytes."""
from __future__ import annotations

import json
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np

# A 1-minute load average at or above this at the start says another job holds a core: on a
# machine with a couple of cores that alone moves the figures by tens of percent.
QUIET_LOAD = 0.5


def physical_cores() -> int:
    """Cores, not hyper-threads (two matmul threads on one core only fight for its SIMD units),
    counted by the native runtime, whose default thread count it is; os.cpu_count() without it."""
    from edgeact import runtime

    return runtime.physical_cores() if runtime.available() else os.cpu_count() or 1


def load_average() -> tuple[float, float, float]:
    """1, 5 and 15-minute load averages (zeros where the OS does not say)."""
    try:
        return os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = (s.strip() for s in line.partition(":"))
            if key in ("model name", "Hardware", "Model"):
                return val
    except OSError:
        pass
    return platform.processor() or platform.machine()


def clock() -> dict:
    """The clock the OS reports for CPU 0 (cpufreq where the VM exposes it, else /proc/cpuinfo's MHz)."""
    out = {}
    cur = _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq")
    if cur:
        out["cur_mhz"] = int(cur) / 1000
    top = _read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if top:
        out["max_mhz"] = int(top) / 1000
    gov = _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    if gov:
        out["governor"] = gov
    if "cur_mhz" not in out:
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("cpu MHz"):
                    out["cpuinfo_mhz"] = float(line.split(":")[1])
                    break
        except (OSError, ValueError):
            pass
    return out


SIMD_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "asimd",
              "asimddp", "sve")


def cpu_flags() -> list[str]:
    """The SIMD extensions the kernels may use, as the CPU reports them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = (s.strip() for s in line.partition(":"))
            if key in ("flags", "Features"):
                have = set(val.split())
                return [f for f in SIMD_FLAGS if f in have]
    except OSError:
        pass
    return []


def machine(threads: int) -> dict:
    """The facts a reader needs to compare a table with their own machine (the kernel set the
    native runtime chose is added by its worker: it is known once a model is loaded)."""
    return {"cpu": cpu_model(), "machine": platform.machine(), "logical_cpus": os.cpu_count(),
            "physical_cores": physical_cores(), "threads": threads, "simd": cpu_flags(), "clock": clock(),
            "load_average_at_start": list(load_average()), "date": time.strftime("%Y-%m-%d")}


def quiet(load: tuple[float, ...] | list[float]) -> bool:
    return load[0] < QUIET_LOAD


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


def folder_facts(folder: Path) -> dict:
    """Bytes a decode step reads (all weights but the embedding table, of which one
    row is read; a shared table is the lm_head's, read whole) and the KV cache size per
    token of context. File bytes: the native runtime's repacked weights are smaller than
    the file's (fp32 scales), so its share of read bandwidth can pass 100%."""
    meta = json.loads((folder / "edgeact.json").read_text())
    cfg = meta["config"]
    files = [folder / "model.onnx"] + ([folder / "model.onnx.data"] if (folder / "model.onnx.data").exists() else [])
    total = sum(f.stat().st_size for f in files)
    emb_bytes = {"fp32": 4, "fp16": 2, "shared": 0}.get(meta.get("quantization", {}).get("embedding", "fp32"), 4)
    embed = cfg["vocab_size"] * cfg["hidden_size"] * emb_bytes
    kv = meta.get("kv_cache") or {"num_kv_heads": cfg["num_kv_heads"], "head_dim": cfg["head_dim"]}
    kv_per_token = 2 * cfg["num_layers"] * kv["num_kv_heads"] * kv["head_dim"] * 4
    return {"file_bytes": total, "decode_weight_bytes": total - embed, "kv_bytes_per_token": kv_per_token,
            "vocab_size": cfg["vocab_size"], "meta": meta}
