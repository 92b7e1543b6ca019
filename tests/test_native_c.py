"""The native C tests from pytest: `make test`, `make test-asan`, `make test-aarch64`
(under qemu-user) and a short loader fuzz run, each in its own build directory."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

NATIVE = Path(__file__).resolve().parents[1] / "native"


def _make(tmp_path, *args, timeout=900):
    if shutil.which("make") is None or shutil.which("gcc") is None:
        pytest.skip("make or gcc not installed")
    res = subprocess.run(["make", "-j2", "-C", str(NATIVE), f"BUILD={tmp_path / 'build'}", *args],
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return res.stdout


def test_make_test(tmp_path):
    out = _make(tmp_path, "test")
    assert "test_runtime:" in out and "ok: 0 failure(s)" in out


def test_make_test_asan(tmp_path):
    out = _make(tmp_path, "test-asan")
    assert out.count("ok: 0 failure(s)") >= 2


@pytest.mark.qemu
def test_make_test_aarch64(tmp_path):
    if shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which("qemu-aarch64") is None:
        pytest.skip("aarch64-linux-gnu-gcc or qemu-aarch64 not installed")
    out = _make(tmp_path, "test-aarch64", timeout=1500)
    assert out.count("test_runtime: ") == 2 and "FAILED" not in out


def test_loader_fuzz_short(tmp_path):
    out = _make(tmp_path, "fuzz", "FUZZ_SECONDS=10")
    assert "no crash" in out
