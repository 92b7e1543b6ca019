"""The tied table stored once, on the native runtime: GatherBlockQuantized reads its rows from
lm_head's SIMD repack when lm_head has one (else from the file layout), so only one copy of the
table stays resident. Every row of the lookup equals numpy's dequantization of the file's
initializers bit for bit (4- and 8-bit, with and without zero points, K padded to the block, a
vocabulary that is not a multiple of the repack's 8-row groups), on the best ISA and the scalar
one; native equals onnxruntime at accuracy level 4 (the repack path); the file's table pages stay
released after the lookups; a shared table imported from a GGUF's Q8_0 blocks (8-bit, symmetric:
zero point 128) runs natively and equals onnxruntime.
"""
from __future__ import annotations

import numpy as np
import pytest

runtime = pytest.importorskip("edgeact.runtime")
if not runtime.available():
    pytest.skip(runtime.unavailable_reason(), allow_module_level=True)

from edgeact.converters.convert import convert  # noqa: E402
from edgeact.converters.quantize import QuantizedWeight, dequantize  # noqa: E402
from edgeact.converters.random_model import random_source  # noqa: E402
from edgeact.runtime import NativeModel  # noqa: E402


def _passthrough_source(seed=3, **overrides):
    """A tied llama-family model whose layers add nothing (o_proj and down_proj are zero): every
    hidden.{i} is the embedding lookup itself, so capture shows the lookup's exact output."""
    src = random_source("tiny", seed=seed, tie_word_embeddings=True, **overrides)
    tensors = dict(src.tensors)
    for name, load in src.tensors.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            shape = load().shape
            tensors[name] = lambda shape=shape: np.zeros(shape, np.float32)
    src.tensors = tensors
    return src


def _table(folder) -> np.ndarray:
    """numpy's dequantization of lm_head's initializers (the one table), cut to the hidden width."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(folder / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t, base_dir=str(folder)) for t in model.graph.initializer}
    head = next(n for n in model.graph.node if n.name == "lm_head")
    assert head.op_type == "MatMulNBits" and any(n.op_type == "GatherBlockQuantized" for n in model.graph.node)
    a = {x.name: helper.get_attribute_value(x) for x in head.attribute}
    zp = inits[head.input[3]] if len(head.input) > 3 and head.input[3] else None
    cast = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Cast"}   # fp16 scales
    scales = inits[cast.get(head.input[2], head.input[2])].astype(np.float32)
    qw = QuantizedWeight(inits[head.input[1]], scales, zp, a["K"], a["N"], a["bits"], a["block_size"])
    return dequantize(qw)


def _lookups(folder, ids, monkeypatch, isa):
    for k in ("EDGEACT_ISA", "EDGEACT_NO_AVX512", "EDGEACT_NO_VNNI"):
        monkeypatch.delenv(k, raising=False)
    if isa:
        monkeypatch.setenv("EDGEACT_ISA", isa)
    model = NativeModel(folder)
    sess = model.session(threads=2, max_chunk=64)
    sess.capture_hidden(True)
    rows = []
    for at in range(0, len(ids), 64):
        sess.reset()
        sess.forward(ids[at:at + 64])
        h = sess.hidden_states()
        assert all(np.array_equal(h[0], h[i]) for i in range(1, h.shape[0]))   # the layers add nothing
        rows.append(h[0])
    return model, np.concatenate(rows)


@pytest.mark.parametrize("lm_head,symmetric", [("int4", False), ("int4", True), ("int8", False), ("int8", True)])
@pytest.mark.parametrize("isa", [None, "scalar"])
def test_every_row_equals_numpy(tmp_path, monkeypatch, lm_head, symmetric, isa):
    """hidden 40 (blocks of 32: rows padded to 64, a Slice drops the padding), vocabulary 300 (the
    last 8-row group of the repack has 4 rows)."""
    src = _passthrough_source(hidden_size=40, num_heads=2, num_kv_heads=1, head_dim=20)
    folder = convert(src, tmp_path / "m", quant="int4", lm_head=lm_head, embedding="shared", symmetric=symmetric,
                     progress=False)
    want = _table(folder)
    ids = np.arange(src.config.vocab_size, dtype=np.int64)
    model, got = _lookups(folder, ids, monkeypatch, isa)
    if isa is None:
        assert model.isa != "scalar"   # lm_head has a repack: the lookup reads it
    assert got.shape == want.shape and np.array_equal(got, want)


def _mapped_rss_kb(path) -> int:
    """Resident kB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:
            inside = len(head) >= 6 and head[5] == str(path)
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


def test_lookups_leave_the_file_table_released(tmp_path, monkeypatch):
    """A table of 16384 x 512 int4 (4 MiB of codes): lm_head's repack released its file pages at load,
    and a lookup of rows from all over the table does not map them back (reading the file layout
    did: each row mapped the large folio around it)."""
    import os

    if not os.path.exists("/proc/self/smaps"):
        pytest.skip("needs /proc/self/smaps")
    src = _passthrough_source(vocab_size=16384, hidden_size=512, num_heads=4, num_kv_heads=2, head_dim=128,
                              intermediate_size=64, num_layers=1)
    folder = convert(src, tmp_path / "m", quant="int4", lm_head="int4", embedding="shared", external_data=True,
                     progress=False)
    data = (folder / "model.onnx.data").resolve()
    ids = np.random.default_rng(0).permutation(src.config.vocab_size)[:512].astype(np.int64)
    model, got = _lookups(folder, ids, monkeypatch, None)
    assert model.isa != "scalar"
    assert np.array_equal(got, _table(folder)[ids])
    table_kb = src.config.vocab_size * 512 // 2 // 1024
    assert _mapped_rss_kb(data) < table_kb // 8, (_mapped_rss_kb(data), table_kb)


def test_q8_0_shared_table_matches_onnxruntime(tmp_path):
    """`--quant source --embedding shared` of a GGUF whose token_embd is Q8_0 (8-bit, no zero points:
    128, as onnxruntime) and whose linears are Q4_0 / Q8_0 (integer zero points): native equals
    onnxruntime at accuracy level 4 (activations rounded to int8 per block by both)."""
    from test_gguf_import import _write_quantized_gguf
    from test_native_engine import OrtRef, _ids, _kl_top1

    types = {"q_proj": "Q4_0", "k_proj": "Q8_0", "v_proj": "Q4_0", "o_proj": "Q8_0", "gate_proj": "Q4_0",
             "up_proj": "Q4_0", "down_proj": "Q8_0"}
    base = random_source("tiny", seed=4, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
                         head_dim=16, tie_word_embeddings=True)
    _write_quantized_gguf(tmp_path / "m.gguf", base, types)
    folder = convert(tmp_path / "m.gguf", tmp_path / "out", quant="source", embedding="shared", progress=False)
    import onnx

    nodes = {n.op_type: n for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node}
    gbq = nodes["GatherBlockQuantized"]
    assert len(gbq.input) == 3 and [a.i for a in gbq.attribute if a.name == "bits"] == [8]
    model, ref = NativeModel(folder), OrtRef(folder)
    ids = _ids(model.vocab, 128, seed=6)
    kl, top1 = _kl_top1(ref.forward(ids), model.session(threads=2).forward(ids, all_logits=True))
    assert kl <= 1e-3 and top1 >= 0.99, (kl, top1)


@pytest.mark.parametrize("shape", ["gemma3-tiny", "tiny"])
def test_int4_shared_table_at_level_4_matches_onnxruntime(tmp_path, shape):
    """Accuracy level 4: lm_head has a repack, so the lookup reads it (level 1, in test_native_families,
    reads the file layout). Held to the int4 bound of test_native_families (KL 1e-3, top-1 99%)."""
    from test_native_engine import OrtRef, _ids, _kl_top1

    kw = {} if shape == "gemma3-tiny" else {"tie_word_embeddings": True}
    src = random_source(shape, seed=1, max_position_embeddings=512, **kw)
    folder = convert(src, tmp_path / "m", quant="int4", lm_head="int4", embedding="shared", progress=False)
    model, ref = NativeModel(folder), OrtRef(folder)
    assert model.isa != "scalar"
    ids = _ids(model.vocab, 256, seed=6)
    kl, top1 = _kl_top1(ref.forward(ids), model.session(threads=2).forward(ids, all_logits=True))
    assert kl <= 1e-3 and top1 >= 0.99, (kl, top1)
