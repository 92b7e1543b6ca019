"""The race's rules. An engine is timed only while no other engine runs: each repetition of each
engine is a fresh process (or a llama-bench run) that exits before the next starts, so no other
engine's thread pool can spin beside it; repetitions alternate between engines (round r runs
every engine once, starting with a different one each round) so a drift of the machine hits all
alike; and a run whose load average at the start says another job holds a core is refused
unless the caller accepts a contended table, which is then marked as such."""
from __future__ import annotations

import subprocess
import sys
import json
import time
from pathlib import Path

from . import llamabench
from .probes import QUIET_LOAD

SETTLE_S = 0.2          # between runs: the last process's memory returned, its cores idle
RUN_TIMEOUT_S = 1800.0  # one run (load, warm-up, a repetition) longer than this is killed and reported


class ContendedError(ValueError):
    """The machine was busy when the run started."""


def check_quiet(load: list[float] | tuple[float, ...], allow_contended: bool) -> bool:
    """True when the run is contended (and allowed); ContendedError when it is and not allowed."""
    if load[0] < QUIET_LOAD:
        return False
    if allow_contended:
        return True
    raise ContendedError(
        f"load average {load[0]:.2f} over the last minute (quiet is under {QUIET_LOAD}): another job is "
        "running, and its share of the cores would be counted against whichever engine it overlaps; "
        "wait for it, or pass --allow-contended to run anyway (the table is then marked contended)")


def schedule(n_jobs: int, reps: int, alternate: bool = True) -> list[tuple[int, int, int]]:
    """(job, first repetition, repetitions) per run, in order. Alternating: one repetition per
    run, round r starting at job r mod n. Otherwise each job's repetitions in one run."""
    if not alternate:
        return [(j, 0, reps) for j in range(n_jobs)]
    return [((r + k) % n_jobs, r, 1) for r in range(reps) for k in range(n_jobs)]


def worker_cmd(spec: dict) -> list[str]:
    return [sys.executable, "-m", "edgeact.bench", "--worker", json.dumps(spec)]


def _last_error(text: str) -> str:
    return (text.strip().splitlines() or ["worker failed"])[-1]


def run_process(spec: dict, timeout: float | None = None) -> dict:
    """One engine in a fresh interpreter, waited for; errors come back as {'error': ...}."""
    from .subjects import parse_reply

    try:
        proc = subprocess.run(worker_cmd(spec), capture_output=True, text=True,
                              timeout=timeout or RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"no result in {timeout or RUN_TIMEOUT_S:.0f} s"}
    reply = parse_reply(proc.stdout)
    if proc.returncode != 0 or reply is None:
        return {"error": _last_error(proc.stderr)}
    return reply


def _run_measured(cmd: list[str], timeout: float) -> tuple[int | None, str, str, int]:
    """(exit code or None on timeout, stdout, stderr, peak RSS in bytes) of one child process:
    waited for with wait4, whose resource usage is that child's alone."""
    import os
    import tempfile
    import threading

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        killed = threading.Event()

        def kill():
            killed.set()
            proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return (None if killed.is_set() else proc.returncode), out.read(), err.read(), usage.ru_maxrss * 1024


def run_llama_bench(spec: dict, timeout: float | None = None) -> dict:
    """llama-bench on the job's GGUF with its threads, pp and tg; its own repetitions are ours."""
    cmd = llamabench.command(Path(spec["llama_bench"]), Path(spec["gguf"]), threads=spec["threads"],
                             pp=spec["pp"], tg=spec["tg"], reps=spec["reps"])
    at = time.time()
    code, out, err, rss = _run_measured(cmd, timeout or RUN_TIMEOUT_S)
    if code is None:
        return {"error": f"llama-bench gave no result in {timeout or RUN_TIMEOUT_S:.0f} s"}
    if code != 0:
        return {"error": "llama-bench: " + _last_error(err)}
    try:
        got = llamabench.parse(out)
    except ValueError as e:
        return {"error": str(e)}
    return {"pp": got["pp"], "tg": got["tg"], "rep_at": [at] * spec["reps"], "peak_rss": rss,
            "llama_bench": got.get("info", {})}


def run_job(spec: dict) -> dict:
    return run_llama_bench(spec) if spec["engine"] == "llama.cpp" else run_process(spec)


def run_schedule(specs: list[dict], reps: int, alternate: bool = True, run=run_job, progress=print) -> list[dict]:
    """Every job's repetitions in schedule() order, one run at a time; a job that fails is
    reported and skipped from then on. The last run of a job also collects its extras
    (realized sparsity, repack size), which need the engine and are not timed."""
    results = [{"pp": [], "tg": [], "rep_at": []} for _ in specs]
    order = schedule(len(specs), reps, alternate)
    for i, (j, first, n) in enumerate(order):
        res = results[j]
        if "error" in res:
            continue
        spec = {**specs[j], "reps": n, "extras": first + n == reps}
        progress(f"[{i + 1}/{len(order)}] {Path(spec['folder']).name}: {spec['label']}"
                 + (f" repetition {first + 1}/{reps}" if alternate else f" {reps} repetitions"))
        time.sleep(SETTLE_S)
        out = run(spec)
        if "error" in out:
            results[j] = {"error": out["error"]}
            continue
        for key in ("pp", "tg", "rep_at"):
            res[key] += out.get(key, [])
        for k, v in out.items():
            if k == "peak_rss":   # one process per repetition: the largest of them
                res[k] = max(res.get(k, 0), v)
            elif k not in ("pp", "tg", "rep_at"):
                res[k] = v
    return results
