"""Loading a folder does not hold a weight twice: what the loader reads only to check or repack
(the NaN scan of float tensors, MatMulNBits' repack source) goes back to the file as it is read,
so the load's peak resident set stays near what the load ends with. Measured in a child process
(VmHWM, VmRSS from /proc/self/status): a memory bound, not a timing."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

runtime = pytest.importorskip("edgeact.runtime")
if not runtime.available():
    pytest.skip(runtime.unavailable_reason(), allow_module_level=True)

from edgeact.converters.convert import convert  # noqa: E402
from edgeact.converters.random_model import random_source  # noqa: E402

CHILD = r"""
import json, sys
from edgeact.runtime import NativeModel
def status():
    d = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            d[k] = int(v.split()[0]) * 1024
    return d
before = status()
m = NativeModel(sys.argv[1])
after = status()
print(json.dumps({"before": before, "after": after, "isa": m.isa}))
"""

VOCAB, HIDDEN = 65536, 512


def _load_transient(folder) -> dict:
    """VmHWM above VmRSS once a fresh process has loaded `folder`."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True, timeout=300,
                         check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["before"]["VmHWM"] <= r["before"]["VmRSS"] + (1 << 20)   # the interpreter's own peak is behind it
    r["transient"] = r["after"]["VmHWM"] - r["after"]["VmRSS"]
    return r


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc/self/status")
    # a tied model: fp16 embedding table 65536 x 512 (64 MiB) and an int4 lm_head (16 MiB of codes)
    src = random_source("tiny", seed=1, vocab_size=VOCAB, hidden_size=HIDDEN, num_heads=4, num_kv_heads=2,
                        head_dim=128, intermediate_size=64, num_layers=1, tie_word_embeddings=True)
    return convert(src, tmp_path_factory.mktemp("m") / "m", quant="int4", lm_head="int4", embedding="fp16",
                   external_data=True, progress=False)


def test_float_table_scan_gives_its_pages_back(folder):
    """The loader's NaN scan of the fp16 table released it only at the end: the whole table was
    resident at the load's peak (~46 MiB above the end state here)."""
    r = _load_transient(folder)
    assert r["transient"] < VOCAB * HIDDEN * 2 // 2, r


def test_repack_gives_the_file_pages_back_as_it_reads(tmp_path):
    """A shared table (no float table): lm_head's repack read its whole file copy before any of it went
    back, so the codes were resident twice at the load's peak (21 MiB above the end state here, 11
    MiB now: a 4 MiB chunk of source, the float32 copy of the fp16 scales)."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc/self/status")
    src = random_source("tiny", seed=1, vocab_size=VOCAB, hidden_size=HIDDEN, num_heads=4, num_kv_heads=2,
                        head_dim=128, intermediate_size=64, num_layers=1, tie_word_embeddings=True)
    shared = convert(src, tmp_path / "m", quant="int4", lm_head="int4", embedding="shared", external_data=True,
                     progress=False)
    r = _load_transient(shared)
    if r["isa"] == "scalar":
        pytest.skip("the scalar build reads the file layout: no repack")
    assert r["transient"] < VOCAB * HIDDEN // 2, r


def test_scale_copies_go_as_their_readers_are_repacked(tmp_path):
    """fp16 block scales are read through a float32 copy made at load. Each copy goes once its
    MatMulNBits is repacked, not at the end of planning: with every layer's copy held until then,
    the load's peak sat their sum (26 MiB here) above the end state."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc/self/status")
    src = random_source("tiny", seed=1, vocab_size=4096, hidden_size=512, num_heads=4, num_kv_heads=2,
                        head_dim=128, intermediate_size=8192, num_layers=16, tie_word_embeddings=False)
    folder = convert(src, tmp_path / "m", quant="int4", group_size=32, lm_head="int4", embedding="fp16",
                     external_data=True, progress=False)
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    casts = {n.input[0] for n in graph.node if n.op_type == "Cast"}
    copies = sum(4 * int(np.prod(t.dims)) for t in graph.initializer
                 if t.name in casts and t.data_type == onnx.TensorProto.FLOAT16)
    assert copies > 20 << 20   # the model writes fp16 scales behind a Cast: the copies exist
    r = _load_transient(folder)
    if r["isa"] == "scalar":
        pytest.skip("the scalar build reads the file layout: the copies are kept")
    assert r["transient"] < copies // 2, (r, copies)
