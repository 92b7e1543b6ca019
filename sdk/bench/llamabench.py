"""llama.cpp's own benchmark, `llama-bench`, as the baseline row of `edgeact bench`.

Built once from the llama.cpp sources inside the llama-cpp-python sdist pinned here (so the
baseline is the llama.cpp the interop tests use), with cmake from PyPI and the build machine's
native CPU flags, into a cache folder; nothing of llama.cpp lands in this repository. Its `-o
json` output is parsed into the same per-repetition figures as our engines' rows.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# The llama-cpp-python release whose bundled llama.cpp is the baseline; .ci/run installs the same.
LLAMA_CPP_PYTHON = "0.3.36"
CACHE = Path(os.environ.get("EDGEACT_HOME", Path.home() / ".cache" / "edgeact"))
BUILD_JOBS = 2


def home() -> Path:
    return CACHE / f"llama-bench-{LLAMA_CPP_PYTHON}"


def binary() -> Path | None:
    """The built llama-bench, or None before `edgeact bench --setup-llama-bench`."""
    exe = home() / "llama-bench"
    return exe if exe.is_file() and os.access(exe, os.X_OK) else None


def _run(cmd: list, log, **kw) -> None:
    log.write(f"$ {' '.join(map(str, cmd))}\n")
    log.flush()
    proc = subprocess.run(list(map(str, cmd)), stdout=log, stderr=subprocess.STDOUT, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(map(str, cmd[:3]))} ...` failed (exit {proc.returncode}); see {log.name}")


def _cmake(work: Path, log) -> str:
    """cmake from PyPI in a private folder (the system may have none, or one too old)."""
    target = CACHE / "cmake"
    exe = next(iter(target.glob("cmake/data/bin/cmake")), None)
    if exe is None:
        _run([sys.executable, "-m", "pip", "install", "-q", "--target", target, "cmake"], log)
        exe = next(iter(target.glob("cmake/data/bin/cmake")), None)
    if exe is None:
        raise RuntimeError(f"the PyPI cmake package installed no cmake binary under {target}")
    return str(exe)


def quantize_binary() -> Path | None:
    """llama.cpp's own quantizer, built beside llama-bench (the GGUF baseline needs no Python binding)."""
    exe = home() / "llama-quantize"
    return exe if exe.is_file() and os.access(exe, os.X_OK) else None


TARGETS = ("llama-bench", "llama-quantize")


def setup(progress=print, jobs: int = BUILD_JOBS, sdist: Path | None = None) -> Path:
    """Download the pinned sdist, build llama-bench and llama-quantize (static, native CPU flags)
    and cache them; returns llama-bench's path. About ten minutes on two cores; a second call
    returns the cached binary. The sources and build tree are deleted afterwards."""
    exe = binary()
    if exe is not None and quantize_binary() is not None:
        progress(f"llama-bench {LLAMA_CPP_PYTHON} already built: {exe}")
        return exe
    out = home()
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "build.log"
    with open(log_path, "w") as log, tempfile.TemporaryDirectory(dir=out) as tmp:
        work = Path(tmp)
        if sdist is None:
            progress(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} sdist (llama.cpp sources) ...")
            # --no-binary for this package only: for :all:, pip would also build cmake itself from source
            _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", "llama-cpp-python",
                  f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", work], log)
            sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
        progress("unpacking ...")
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        src = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
        progress("getting cmake from PyPI ...")
        cmake = _cmake(work, log)
        build = work / "build"
        progress(f"configuring llama.cpp (native CPU flags, {jobs} build jobs; log: {log_path}) ...")
        _run([cmake, "-S", src, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
              "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
              "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=ON"], log)
        progress(f"building {' and '.join(TARGETS)} (about ten minutes on two cores) ...")
        _run([cmake, "--build", build, "--target", *TARGETS, "-j", jobs], log)
        for name in TARGETS:
            built = build / "bin" / name
            if not built.is_file():
                raise RuntimeError(f"the build made no bin/{name}; see {log_path}")
            shutil.copy2(built, out / f"{name}.tmp")
            os.replace(out / f"{name}.tmp", out / name)
    progress(f"llama-bench built: {out / 'llama-bench'}")
    return out / "llama-bench"


def command(exe: Path, gguf: Path, *, threads: int, pp: int, tg: int, reps: int) -> list[str]:
    """One llama-bench invocation: pp and tg as separate tests (its default), our thread count,
    its JSON output. Warm-up is llama-bench's own (one untimed run before the repetitions)."""
    return [str(exe), "-m", str(gguf), "-t", str(threads), "-p", str(pp), "-n", str(tg), "-r", str(reps),
            "-o", "json"]


def parse(text: str) -> dict:
    """llama-bench `-o json` output -> {'pp': [t/s per repetition], 'tg': [...], 'build': ..., 'cpu': ...}.
    A test with n_prompt > 0 and n_gen == 0 is pp, the reverse is tg; anything else (pp+tg
    combined tests) is not one of ours and is refused."""
    start = text.find("[")
    if start < 0:
        raise ValueError("llama-bench printed no JSON array")
    try:
        rows = json.loads(text[start:])
    except json.JSONDecodeError as e:
        raise ValueError(f"llama-bench output is not valid JSON: {e}") from None
    if not isinstance(rows, list) or not rows:
        raise ValueError("llama-bench output holds no tests")
    out = {"pp": [], "tg": []}
    for row in rows:
        n_prompt, n_gen = int(row.get("n_prompt", 0)), int(row.get("n_gen", 0))
        if n_prompt > 0 and n_gen == 0:
            kind, n = "pp", n_prompt
        elif n_gen > 0 and n_prompt == 0:
            kind, n = "tg", n_gen
        else:
            raise ValueError(f"llama-bench test pp{n_prompt}+tg{n_gen} is neither a pp nor a tg test")
        samples = row.get("samples_ns")
        if not samples:
            raise ValueError(f"llama-bench {kind}{n} row has no samples_ns")
        # per repetition, from its own nanoseconds (samples_ts is the same; derive it so both agree)
        out[kind] = [n / (ns / 1e9) for ns in samples]
        out[f"{kind}_n"] = n
        for key in ("build_commit", "build_number", "cpu_info", "model_type", "model_size", "n_threads",
                    "type_k", "n_batch", "n_ubatch"):
            if key in row:
                out.setdefault("info", {})[key] = row[key]
    return out
