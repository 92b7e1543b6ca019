"""The kernel variant the native runtime reports is the one that runs: the best the CPU has
(read from /proc/cpuinfo here, independently of the C side's CPUID/HWCAP), or EDGEACT_ISA's,
chosen at each model load; `edgeact info`, the profile table and the bench report name it.
The physical core count comes from the C side."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest

runtime = pytest.importorskip("edgeact.runtime")
if not runtime.available():
    pytest.skip(runtime.unavailable_reason(), allow_module_level=True)

from edgeact.converters.convert import convert  # noqa: E402
from edgeact.converters.random_model import random_source  # noqa: E402
from edgeact.runtime import NativeModel, NativeSession  # noqa: E402


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = (s.strip() for s in line.partition(":"))
            if key in ("flags", "Features"):
                return set(val.split())
    except OSError:
        pass
    return set()


def _expected_isa() -> str | None:
    flags, arch = _cpu_flags(), platform.machine()
    if not flags:
        return None
    if arch in ("x86_64", "AMD64"):
        if not {"avx2", "fma", "f16c"} <= flags:
            return "scalar"
        if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags:
            return "avx512-vnni"
        return "avx2-vnni" if "avx_vnni" in flags else "avx2"
    if arch == "aarch64":
        return "neon-dotprod" if "asimddp" in flags else "neon"
    return None


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return convert(random_source("tiny", seed=3), tmp_path_factory.mktemp("isa") / "int4", quant="int4",
                   progress=False)


@pytest.fixture
def clean_env(monkeypatch):
    for k in ("EDGEACT_ISA", "EDGEACT_NO_AVX512", "EDGEACT_NO_VNNI"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_reported_isa_is_the_best_the_cpu_has(folder, clean_env):
    want = _expected_isa()
    if want is None:
        pytest.skip("no /proc/cpuinfo flags to compare with")
    assert runtime.default_isa() == want
    model = NativeModel(folder)
    assert model.info()["isa"] == want
    sess = NativeSession(model, threads=1)
    sess.profile(True)
    sess.forward([1, 2, 3])
    assert runtime.format_profile(sess.profile_records(), isa=model.isa).splitlines()[0] == f"kernels: {want}"


def test_edgeact_isa_is_read_at_each_load(folder, clean_env):
    assert NativeModel(folder).info()["isa"] != "unknown"
    clean_env.setenv("EDGEACT_ISA", "scalar")
    assert runtime.default_isa() == "scalar" and NativeModel(folder).info()["isa"] == "scalar"
    clean_env.setenv("EDGEACT_ISA", "sse9")
    assert runtime.default_isa() == "unavailable"
    with pytest.raises(Exception, match="unknown ISA name"):
        NativeModel(folder)
    clean_env.delenv("EDGEACT_ISA")
    if _expected_isa() == "avx512-vnni":
        clean_env.setenv("EDGEACT_NO_AVX512", "1")
        assert NativeModel(folder).info()["isa"] in ("avx2-vnni", "avx2")
        clean_env.setenv("EDGEACT_NO_VNNI", "1")
        assert NativeModel(folder).info()["isa"] == "avx2"


def test_physical_cores_come_from_the_runtime():
    from edgeact.bench import physical_cores

    n = runtime.physical_cores()
    assert 1 <= n <= (os.cpu_count() or 1)
    assert physical_cores() == n
