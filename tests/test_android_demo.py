"""The aarch64 static CLI of android-demo/ gives the same greedy tokens as the
SDK on the host (NEON kernels under qemu-aarch64, with and without dotprod)."""
import shutil
import subprocess
from pathlib import Path

import pytest

import edgeact
from edgeact.converters.convert import convert
from edgeact.converters.random_model import random_source

DEMO = Path(__file__).resolve().parent.parent / "android-demo"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return convert(random_source("tiny", seed=5), tmp_path_factory.mktemp("demo") / "tiny-int4", quant="int4",
                   progress=False)


def _build(target, build_dir):
    subprocess.run(["make", "-s", "-C", str(DEMO), target, f"BUILD={build_dir}"], check=True, timeout=600)


def _tokens(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    return [int(t) for t in out.stdout.split()]


def test_host_cli_matches_sdk(folder, tmp_path):
    _build("cli", tmp_path)
    want = edgeact.load(folder, engine="ort").generate([1, 5, 7], max_new_tokens=8).ids
    assert _tokens([str(tmp_path / "edgeact-cli"), str(folder), "-n", "8", "1", "5", "7"]) == want


@pytest.mark.qemu
@pytest.mark.parametrize("cpu", ["max", "cortex-a57"])
def test_aarch64_cli_under_qemu(folder, tmp_path, cpu):
    if not shutil.which("aarch64-linux-gnu-gcc") or not shutil.which("qemu-aarch64"):
        pytest.skip("aarch64-linux-gnu-gcc / qemu-aarch64 not installed (apt-get install gcc-aarch64-linux-gnu qemu-user)")
    _build("cli-aarch64", tmp_path)
    want = edgeact.load(folder, engine="ort").generate([1, 5, 7], max_new_tokens=8).ids
    got = _tokens(["qemu-aarch64", "-cpu", cpu, str(tmp_path / "edgeact-cli-aarch64"), str(folder), "-n", "8",
                   "1", "5", "7"])
    assert got == want


def test_cli_rejects_bad_input(folder, tmp_path):
    _build("cli", tmp_path)
    cli = str(tmp_path / "edgeact-cli")
    bad_id = subprocess.run([cli, str(folder), "1", "99999"], capture_output=True, text=True, timeout=60)
    assert bad_id.returncode == 1 and "error" in bad_id.stderr and "99999" in bad_id.stderr
    missing = subprocess.run([cli, str(tmp_path / "nope"), "1"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "loading the model" in missing.stderr
    junk = subprocess.run([cli, str(folder), "x1"], capture_output=True, text=True, timeout=60)
    assert junk.returncode == 2
