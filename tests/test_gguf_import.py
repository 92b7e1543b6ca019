"""Quantized GGUF sources imported without a second rounding: for every block type whose grid
MatMulNBits holds (with float zero points where the block has a minimum), our dequantized
weights equal the gguf package's dequantization bit for bit; the rest is re-rounded with a
note. Also: float zero points as onnxruntime's MatMulNBits reads them, and `convert
--quant source` end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize  # noqa: E402

from edgeact.converters.quantize import (block_minimums, dequantize, quantize_blockwise,  # noqa: E402
                                         unpack_codes)
from edgeact.converters.readers.gguf_blocks import import_weight  # noqa: E402

# byte offsets of each type's fp16 fields (d, and dmin/m), which random bytes must keep finite
F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2],
              "Q5_K": [0, 2], "Q6_K": [208], "Q3_K": [108], "IQ4_XS": [0]}
EXACT = ("Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K")


def random_blocks(name: str, N: int, K: int, seed: int = 0) -> np.ndarray:
    """Any bytes are a valid block except the fp16 fields, set to small positive scales."""
    rng = np.random.default_rng(seed)
    per, nbytes = GGML_QUANT_SIZES[T[name]]
    b = rng.integers(0, 256, (N, K // per, nbytes), dtype=np.uint8)
    for o in F16_FIELDS[name]:
        b[..., o:o + 2] = (rng.random((N, K // per, 1)) * 0.01 + 1e-4).astype(np.float16).view(np.uint8)
    b[0, 0, 4:8] = 0   # K-quants: a sub-block with scale 0 (and for others, codes 0)
    return b.reshape(N, -1)


@pytest.mark.parametrize("name", EXACT)
def test_exact_types_bit_for_bit(name):
    N, K = 12, 512
    data = random_blocks(name, N, K, seed=len(name))
    im = import_weight(data, T[name], (N, K))
    ref = gguf_dequantize(data, T[name]).reshape(N, K)
    got = dequantize(im.qw)
    assert im.exact and im.note is None, im.note
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))
    assert im.qw.block_size == 32 and im.qw.bits == (4 if name in ("Q4_0", "Q4_1", "Q4_K") else 8)
    assert im.qw.float_zero_points == (name in ("Q4_1", "Q4_K"))


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q8_0"])
def test_gguf_quantized_weights_bit_for_bit(name):
    """Blocks from gguf's own quantizer (real scales, minimums and codes), with a row order applied."""
    w = (np.random.default_rng(3).standard_normal((24, 256)) * 0.05).astype(np.float32)
    w[5] += 0.03   # all-positive-ish rows: minimums of both signs
    data = gguf_quantize(w, T[name])
    order = np.random.default_rng(4).permutation(24)
    im = import_weight(data, T[name], w.shape, row_order=order)
    ref = gguf_dequantize(data, T[name]).reshape(w.shape)[order]
    assert im.exact and np.array_equal(dequantize(im.qw), ref)


def test_q6_k_exact_blocks_and_note():
    N, K = 8, 512
    data = random_blocks("Q6_K", N, K, seed=5)
    blocks = data.reshape(N, K // 256, -1)
    blocks[:4, :, 192:208] = np.int8(3).view(np.uint8)   # equal sub-scales: exactly an 8-bit grid
    data = blocks.reshape(N, -1)
    im = import_weight(data, T["Q6_K"], (N, K))
    ref = gguf_dequantize(data, T["Q6_K"]).reshape(N, K)
    got = dequantize(im.qw)
    assert np.array_equal(got[:4], ref[:4])
    assert not im.exact and "re-rounded" in im.note
    # re-rounded blocks: within half an 8-bit step of their own range
    step = np.abs(ref[4:]).reshape(4, -1, 32).max(-1) / 127
    assert np.all(np.abs(got[4:] - ref[4:]).reshape(4, -1, 32) <= step[..., None] * 0.5 * (1 + 1e-5) + 1e-12)


@pytest.mark.parametrize("name", ["Q3_K", "IQ4_XS", "Q5_1", "Q5_K"])
def test_other_types_re_rounded_with_note(name):
    N, K = 4, 256
    data = random_blocks(name, N, K, seed=9)
    im = import_weight(data, T[name], (N, K))
    ref = gguf_dequantize(data, T[name]).reshape(N, K)
    assert not im.exact and name in im.note and im.qw.bits == (8 if name.startswith("Q5") else 4)
    step = im.qw.scales.reshape(N, -1)
    assert np.all(np.abs(dequantize(im.qw) - ref).reshape(N, -1, 32) <= step[..., None] * 0.5 * (1 + 1e-4) + 1e-9)


def test_float_zero_points_rtn():
    w = (np.random.default_rng(0).standard_normal((37, 100)) * 0.05).astype(np.float32)
    w[1, :40] = 0.0
    w[2, :32] = 0.25                     # a constant block: scale 0, minimum 0.25
    qw = quantize_blockwise(w, 4, 32, float_zero_points=True)
    assert qw.zero_points.dtype == np.float32 and qw.zero_points.shape == (37 * 4,)
    err = np.abs(dequantize(qw) - w)
    scale = np.repeat(qw.scales.reshape(37, -1), 32, axis=1)[:, :100]
    assert np.all(err <= scale / 2 * (1 + 1e-5) + 1e-4 * np.abs(w))   # + the fp16 minimum's rounding
    assert np.all(dequantize(qw)[2, :32] == np.float32(0.25))
    m = block_minimums(qw)
    assert np.array_equal(m, m.astype(np.float16).astype(np.float32))  # fp16 minimums, recovered exactly


def test_float_zero_points_match_onnxruntime():
    from test_quantize import _ort_matmulnbits

    for name in ("Q4_1", "Q4_K"):
        N, K = 16, 256
        im = import_weight(random_blocks(name, N, K, seed=1), T[name], (N, K))
        x = np.random.default_rng(2).standard_normal((3, K)).astype(np.float32)
        ref = x @ dequantize(im.qw).T
        np.testing.assert_allclose(_ort_matmulnbits(x, im.qw), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_smollm2_tensors_import_exactly(smollm2_gguf):
    from edgeact.converters.readers import read_source

    src = read_source(smollm2_gguf)
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.0.self_attn.k_proj.weight", "model.layers.7.mlp.down_proj.weight",
             "model.layers.29.mlp.up_proj.weight"]
    for name in names:
        im = src.quantized[name]()
        assert im.exact, (name, im.note)
        assert np.array_equal(dequantize(im.qw), src.load(name)), name   # rows permuted like the float loader


Q4_K_M_BYTES = 105.5e6   # llama.cpp's Q4_K_M of SmolLM2-135M-Instruct


@pytest.mark.slow
def test_smollm2_default_folder_within_q4_k_m_size(smollm2_gguf, tmp_path):
    """The default convert of SmolLM2's Q4_1 GGUF: the tied table stored once (the source's Q8_0 blocks),
    fp16 scales and fp16 block minimums, the whole folder (tokenizer included) within Q4_K_M's bytes; the
    linears as numpy reads the file equal gguf's dequantization bit for bit, and the native runtime keeps
    no float32 copy of the fp16 parameters once its repack holds them."""
    import json

    from edgeact.converters.convert import convert
    from edgeact.converters.onnx_writer import stored_weights
    from edgeact.converters.readers import read_source
    from edgeact.runtime import NativeModel, available

    out = convert(smollm2_gguf, tmp_path / "smol", quant="source", progress=False)
    size = sum(f.stat().st_size for f in out.iterdir())
    assert size <= Q4_K_M_BYTES, size
    meta = json.loads((out / "edgeact.json").read_text())["quantization"]
    assert meta["embedding"] == "shared" and meta["re_rounded"] == [], meta
    src = read_source(smollm2_gguf)
    stored = stored_weights(out)
    for name in ["lm_head.weight", *(f"model.layers.{i}.{p}.weight" for i in (0, 29)
                                     for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"))]:
        want = src.load("model.embed_tokens.weight" if name == "lm_head.weight" else name)
        assert np.array_equal(dequantize(stored[name]), want), name
    if available():
        assert NativeModel(out).weight_bytes["copied"] <= 1 << 20


def _write_quantized_gguf(path, src, types: dict[str, str], embedding: str = "Q8_0"):
    """A llama GGUF of `src` whose linears are quantized by gguf's own quantizer (types by HF suffix)."""
    from edgeact.converters.gguf_export import _LAYER_NAMES, _to_interleaved

    cfg = src.config
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("context_length", 256), ("embedding_length", cfg.hidden_size),
                       ("block_count", cfg.num_layers), ("feed_forward_length", cfg.intermediate_size),
                       ("head_count", cfg.num_heads), ("head_count_kv", cfg.num_kv_heads)):
        getattr(w, f"add_{key}")(value)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("none")

    def add(name, arr, qtype):
        if qtype == "F32":
            w.add_tensor(name, arr.astype(np.float32))
        else:
            w.add_tensor(name, gguf_quantize(arr, T[qtype]), raw_dtype=T[qtype])

    add("token_embd.weight", src.load("model.embed_tokens.weight"), embedding)
    for i in range(cfg.num_layers):
        for hf, gg in _LAYER_NAMES.items():
            arr = src.load(f"model.layers.{i}.{hf}")
            if "q_proj" in hf:
                arr = _to_interleaved(arr, cfg.num_heads)
            elif "k_proj" in hf:
                arr = _to_interleaved(arr, cfg.num_kv_heads)
            add(f"blk.{i}.{gg}", arr, "F32" if arr.ndim == 1 else types[hf.split(".")[1]])
    add("output_norm.weight", src.load("model.norm.weight"), "F32")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_convert_source_keeps_blocks(tmp_path):
    """convert(quant="source"): every linear in the folder, as numpy reads the file (fp16 scales and
    minimums through the graph's Cast and Div), holds the GGUF's values bit for bit, and both engines run
    the folder close to the fp32 reference on the same (dequantized) weights."""
    import onnx
    from onnx import TensorProto

    import edgeact
    from edgeact.converters.convert import convert
    from edgeact.converters.onnx_writer import stored_weights
    from edgeact.converters.random_model import random_source
    from edgeact.converters.readers import read_source
    from edgeact.evaluate import Reference

    types = {"q_proj": "Q4_1", "k_proj": "Q4_0", "v_proj": "Q8_0", "o_proj": "Q5_0", "gate_proj": "Q4_1",
             "up_proj": "Q5_1", "down_proj": "Q4_1"}   # Q5_1: re-rounded, the rest exact
    base = random_source("tiny", seed=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
                         head_dim=16, tie_word_embeddings=True)
    _write_quantized_gguf(tmp_path / "m.gguf", base, types)
    src = read_source(tmp_path / "m.gguf")
    out = convert(tmp_path / "m.gguf", tmp_path / "out", quant="source", progress=False)
    meta = json.loads((out / "edgeact.json").read_text())["quantization"]
    assert meta["weights"] == "source" and meta["lm_head"] == "source"
    assert meta["imported"]["Q4_1 -> int4 g32 float zero points"] == 3 * base.config.num_layers
    # the default for a tied source: one table, the source's own Q8_0 blocks (nothing re-rounded)
    assert meta["embedding"] == "shared" and not any("embed_tokens" in line for line in meta["re_rounded"])

    model = onnx.load(str(out / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {n.input[1][: -len(".B")]: n for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert len(nodes) == 7 * base.config.num_layers + 1
    stored = stored_weights(out)
    for name, node in nodes.items():
        if "up_proj" not in name:   # the source's fp16 block scales, stored as they are, cast in the graph
            assert inits[name + ".scales"].data_type == TensorProto.FLOAT16, name
            assert node.input[2] == name + ".scales.f32", name
        if any(p in name for p in ("q_proj", "gate_proj", "down_proj")):   # Q4_1: fp16 minimums, not fp32 zps
            assert inits[name + ".neg_minimums"].data_type == TensorProto.FLOAT16, name
            assert name + ".zero_points" not in inits and node.input[3] == name + ".zero_points", name
        qw = stored[name]
        want = src.load("model.embed_tokens.weight" if name == "lm_head.weight" else name)
        if "up_proj" in name:
            assert any(line.startswith(name) and "Q5_1" in line for line in meta["re_rounded"])
            assert np.abs(dequantize(qw) - want).max() <= qw.scales.max() / 2 * (1 + 1e-5)
        else:
            assert np.array_equal(dequantize(qw), want), name

    ref = Reference(src, n_tokens=48, seed=3)
    q = ref.compare(edgeact.load(out, engine="ort"))
    assert q.top1 >= 0.9 and q.kl < 0.02, q
    assert ref.compare(edgeact.load(out, engine="native")).kl < 0.02
    # --embedding fp16: the old layout, a float table of its own beside lm_head's (rounded to fp16)
    fp16 = convert(tmp_path / "m.gguf", tmp_path / "fp16", quant="source", embedding="fp16", progress=False)
    meta = json.loads((fp16 / "edgeact.json").read_text())["quantization"]
    assert meta["embedding"] == "fp16" and any("embed_tokens" in line for line in meta["re_rounded"])
    assert ref.compare(edgeact.load(fp16, engine="ort")).kl <= q.kl + 1e-3


def test_tied_q4_1_embedding_keeps_a_table_of_its_own(tmp_path):
    """GatherBlockQuantized takes integer zero points only: a tied Q4_1 embedding (float zero points as
    lm_head) gets an fp16 table of its own by default, and an explicit --embedding shared is refused."""
    from edgeact.converters.convert import convert
    from edgeact.converters.model import ConversionError
    from edgeact.converters.random_model import random_source

    base = random_source("tiny", seed=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
                         head_dim=16, tie_word_embeddings=True)
    _write_quantized_gguf(tmp_path / "m.gguf", base, {p: "Q4_0" for p in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                         "gate_proj", "up_proj", "down_proj")},
                          embedding="Q4_1")
    out = convert(tmp_path / "m.gguf", tmp_path / "out", quant="source", progress=False)
    meta = json.loads((out / "edgeact.json").read_text())["quantization"]
    assert meta["embedding"] == "fp16" and meta["lm_head"] == "source"
    assert meta["imported"]["Q4_1 -> int4 g32 float zero points"] == 1   # lm_head, loaded once
    with pytest.raises(ConversionError, match="needs lm_head blocks with integer zero points"):
        convert(tmp_path / "m.gguf", tmp_path / "shared", quant="source", embedding="shared", progress=False)


@pytest.mark.parametrize("isa", ["scalar", None])
def test_native_float_zero_points(tmp_path, monkeypatch, isa):
    """The native runtime runs float zero points: every kernel takes each block's minimum
    with its scale and adds it times the block's sum of int8 activations (bit-exact with the
    scalar reference on every ISA: test_kernels.c). Against onnxruntime (float
    activations for float zero points, where native rounds them to int8 per block) the KL
    stays small on the scalar reference and the best ISA; a folder whose minimums are
    dropped is ~1000x further off."""
    import edgeact
    from edgeact.converters.convert import convert
    from edgeact.converters.random_model import random_source
    from edgeact.evaluate import compare_logits

    pytest.importorskip("edgeact.runtime")
    types = {"q_proj": "Q4_1", "k_proj": "Q4_1", "v_proj": "Q4_0", "o_proj": "Q4_1", "gate_proj": "Q4_1",
             "up_proj": "Q8_0", "down_proj": "Q4_1"}
    base = random_source("tiny", seed=5, hidden_size=96, intermediate_size=160, num_heads=3, num_kv_heads=1,
                         head_dim=32, tie_word_embeddings=True)
    _write_quantized_gguf(tmp_path / "m.gguf", base, types)
    out = convert(tmp_path / "m.gguf", tmp_path / "out", quant="source", progress=False)
    ids = [1, 7, 42, 5, 99, 3, 250, 17, 8, 64, 2, 11]
    for k in ("EDGEACT_ISA", "EDGEACT_NO_AVX512", "EDGEACT_NO_VNNI"):
        monkeypatch.delenv(k, raising=False)
    if isa:
        monkeypatch.setenv("EDGEACT_ISA", isa)
    got = edgeact.load(out, engine="native").forward(ids)
    ort_logits = edgeact.load(out, engine="ort").forward(ids)
    q = compare_logits(got, ort_logits, ids)
    assert q.kl < 0.005 and q.top1 >= 0.9, q
    # one token alone (decode) gives the prefill's first row
    np.testing.assert_allclose(edgeact.load(out, engine="native").forward(ids[:1])[0], got[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("which", ["smollm2_gguf", "gemma3_gguf"])
def test_open_reader_equals_the_library_reader(which, request):
    """The plain-view reader parses the same fields (types, parts, values) and tensors (names,
    types, shapes, bytes) as gguf.GGUFReader, on the real files."""
    from edgeact.converters.readers.gguf_reader import open_reader

    path = str(request.getfixturevalue(which))
    lib, ours = gguf.GGUFReader(path), open_reader(path)
    assert list(lib.fields) == list(ours.fields)
    for key, f in lib.fields.items():
        g = ours.fields[key]
        assert (f.types, f.data, f.offset) == (g.types, g.data, g.offset), key
        assert len(f.parts) == len(g.parts) and all(a.dtype == b.dtype and np.array_equal(a, b)
                                                    for a, b in zip(f.parts, g.parts)), key
        assert f.contents() == g.contents(), key
    assert len(lib.tensors) == len(ours.tensors)
    for a, b in zip(lib.tensors, ours.tensors):
        assert (a.name, a.tensor_type, list(a.shape), a.data_offset, a.n_bytes) == \
            (b.name, b.tensor_type, list(b.shape), b.data_offset, b.n_bytes)
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape and np.array_equal(a.data, b.data)


def test_gemma3_tensors_import(gemma3_gguf):
    """The real Gemma 3 270M Q4_K_M file: every Q4_K, Q5_0 and Q8_0 tensor bit for bit as gguf
    dequantizes it; Q6_K within half an 8-bit step of each 32-block's range, with a note."""
    N_CHECK = {"Q4_K": 3, "Q5_0": 3, "Q8_0": 2, "Q6_K": 2}
    reader = gguf.GGUFReader(str(gemma3_gguf))
    for t in reader.tensors:
        name = t.tensor_type.name
        if len(t.shape) != 2 or not N_CHECK.get(name) or t.name.startswith("token_embd"):
            continue
        N_CHECK[name] -= 1
        N, K = (int(d) for d in reversed(t.shape))
        im = import_weight(t.data, t.tensor_type, (N, K))
        ref = gguf_dequantize(t.data, t.tensor_type).reshape(N, K)
        got = dequantize(im.qw)
        if name == "Q6_K":
            assert not im.exact and "re-rounded" in im.note
            step = np.abs(ref).reshape(N, -1, 32).max(-1, keepdims=True) / 127
            assert np.all(np.abs(got - ref).reshape(N, -1, 32) <= step * 0.5 * (1 + 1e-5) + 1e-12)
        else:
            assert im.exact and np.array_equal(got, ref), (t.name, im.note)
    assert not any(N_CHECK.values()), N_CHECK
