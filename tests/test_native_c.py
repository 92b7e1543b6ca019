"""The native C tests from pytest: `make test`, `make test-asan`, `make test-aarch64`
(under qemu-user) and a short loader fuzz run, each in its own build directory."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

NATIVE = Path(__file__).resolve().parents[1] / "native"


def _make(tmp_path, *args, timeout=900, env=None):
    if shutil.which("make") is None or shutil.which("gcc") is None:
        pytest.skip("make or gcc not installed")
    res = subprocess.run(["make", "-j2", "-C", str(NATIVE), f"BUILD={tmp_path / 'build'}", *args],
                         capture_output=True, text=True, timeout=timeout, env=env)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return res.stdout


def test_make_test(tmp_path):
    out = _make(tmp_path, "test")
    assert "test_runtime:" in out and "ok: 0 failure(s)" in out


def _sparse_env(tmp_path):
    """test_runtime also runs a small activation-sparse folder loaded with low memory (prefill
    rows on the channel-major copy), so that path runs under the sanitizers and on NEON too, and
    shared-table folders whose lookup it checks against numpy row by row (lookup.f32), and a
    sliding-window folder in which it injects failed forwards."""
    from edgeact.converters.convert import convert
    from edgeact.converters.random_model import random_source
    from edgeact.converters.sparsity import calibrate, parse_targets
    from test_native_shared_table import _passthrough_source, _table

    src = random_source("tiny", seed=2)
    sp = calibrate(src, "teal", parse_targets("0.5", "teal"), calib_tokens=64, progress=False)
    folder = convert(src, tmp_path / "teal", quant="int4", progress=False, sparsity=sp)
    shared = []
    for lm_head, symmetric in (("int4", False), ("int8", True)):
        d = convert(_passthrough_source(hidden_size=40, num_heads=2, num_kv_heads=1, head_dim=20),
                    tmp_path / f"shared-{lm_head}", quant="int4", lm_head=lm_head, embedding="shared",
                    symmetric=symmetric, progress=False)
        _table(d).astype("<f4").tofile(d / "lookup.f32")
        shared.append(str(d))
    sliding = convert(random_source("gemma3-tiny", seed=1, max_position_embeddings=256), tmp_path / "sliding",
                      quant="fp32", progress=False)
    return {**os.environ, "EA_TEST_SPARSE_DIR": str(folder), "EA_TEST_SHARED_DIRS": ":".join(shared),
            "EA_TEST_SLIDING_DIR": str(sliding)}


def test_make_test_asan(tmp_path):
    out = _make(tmp_path, "test-asan", env=_sparse_env(tmp_path))
    assert out.count("ok: 0 failure(s)") >= 2


@pytest.mark.qemu
def test_make_test_aarch64(tmp_path):
    if shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which("qemu-aarch64") is None:
        pytest.skip("aarch64-linux-gnu-gcc or qemu-aarch64 not installed")
    out = _make(tmp_path, "test-aarch64", timeout=1500, env=_sparse_env(tmp_path))
    assert out.count("test_runtime: ") == 2 and "FAILED" not in out


def test_loader_fuzz_short(tmp_path):
    out = _make(tmp_path, "fuzz", "FUZZ_SECONDS=10")
    assert "no crash" in out
