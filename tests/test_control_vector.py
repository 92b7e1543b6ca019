"""llama.cpp control-vector GGUF files: round trip, format details checked with the `gguf` package,
damaged files, and llama.cpp itself applying ours."""
from __future__ import annotations

import ctypes
import struct

import numpy as np
import pytest

from edgeact.control_vector import control_vector_info, load_control_vector, save_control_vector


@pytest.fixture
def gguf():
    return pytest.importorskip("gguf")


def _directions(rng, layers=(1, 2, 5), width=16):
    return {layer: rng.standard_normal(width).astype(np.float32) for layer in layers}


def test_round_trip_is_bit_exact(tmp_path):
    d = _directions(np.random.default_rng(0))
    path = save_control_vector(tmp_path / "v.gguf", d, model_hint="llama")
    back = load_control_vector(path, hidden_size=16, num_layers=6)
    assert list(back) == [1, 2, 5]
    for layer in d:
        assert back[layer].dtype == np.float32
        np.testing.assert_array_equal(back[layer], d[layer])


def test_file_has_the_names_and_types_llama_cpp_reads(tmp_path, gguf):
    d = _directions(np.random.default_rng(1), layers=(3, 1))
    path = save_control_vector(tmp_path / "v.gguf", d, model_hint="qwen2")
    r = gguf.GGUFReader(str(path))

    def text(key):
        f = r.fields[key]
        return bytes(f.parts[f.data[0]]).decode()

    assert text("general.architecture") == "controlvector"
    assert text("controlvector.model_hint") == "qwen2"
    count = r.fields["controlvector.layer_count"]
    assert count.types == [gguf.GGUFValueType.INT32] and int(count.parts[count.data[0]][0]) == 2
    tensors = {t.name: t for t in r.tensors}
    assert set(tensors) == {"direction.1", "direction.3"}
    for name, t in tensors.items():
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(t.shape) == [16]
        np.testing.assert_array_equal(np.asarray(t.data), d[int(name.split(".")[1])])
    info = control_vector_info(path)
    assert info["layers"] == [1, 3] and info["n_embd"] == 16 and info["model_hint"] == "qwen2"
    assert info["norms"][3] == pytest.approx(float(np.linalg.norm(d[3])), rel=1e-6)


@pytest.mark.parametrize("directions, message", [
    ({0: np.ones(4)}, "layer 0"),
    ({1: np.ones(4), 2: np.ones(5)}, "elements"),
    ({1: np.array([1.0, np.nan, 0, 0])}, "NaN"),
    ({1: np.ones((2, 2))}, "1-D"),
    ({}, "non-empty"),
    ({-1: np.ones(4)}, "non-negative"),
])
def test_save_rejects_bad_directions(tmp_path, directions, message):
    with pytest.raises(ValueError, match=message):
        save_control_vector(tmp_path / "bad.gguf", directions)
    assert not (tmp_path / "bad.gguf").exists()


def test_load_rejects_bad_files_with_one_line_reasons(tmp_path):
    path = save_control_vector(tmp_path / "v.gguf", _directions(np.random.default_rng(2), layers=(1, 4)))
    with pytest.raises(ValueError, match="hidden size is 32"):
        load_control_vector(path, hidden_size=32)
    with pytest.raises(ValueError, match="steers layer 4"):
        load_control_vector(path, num_layers=4)
    with pytest.raises(ValueError, match="not found"):
        load_control_vector(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        load_control_vector(junk)


def test_load_names_a_model_gguf_and_direction_0(tmp_path, gguf):
    # A model GGUF passed by mistake names what it is.
    w = gguf.GGUFWriter(str(tmp_path / "model.gguf"), arch="llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ValueError, match="'llama', not a control vector"):
        load_control_vector(tmp_path / "model.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "zero.gguf"), arch="controlvector")
    w.add_tensor("direction.0", np.zeros(4, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ValueError, match="direction.0"):
        load_control_vector(tmp_path / "zero.gguf")


def test_reads_what_the_gguf_package_writes(tmp_path, gguf):
    """Keys of every value type (arrays included) are parsed past."""
    rng = np.random.default_rng(3)
    a, b = (rng.standard_normal(24).astype(np.float32) for _ in range(2))
    w = gguf.GGUFWriter(str(tmp_path / "v.gguf"), arch="controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_int32("controlvector.layer_count", 2)
    w.add_array("some.strings", ["x", "yz", ""])
    w.add_array("some.floats", [1.5, -2.0])
    w.add_uint64("some.u64", 1 << 40)
    w.add_bool("some.flag", True)
    w.add_float64("some.f64", 0.25)
    w.add_tensor("direction.2", a)
    w.add_tensor("direction.7", b)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    back = load_control_vector(tmp_path / "v.gguf", hidden_size=24, num_layers=8)
    assert list(back) == [2, 7]
    np.testing.assert_array_equal(back[2], a)
    np.testing.assert_array_equal(back[7], b)
    from edgeact.control_vector import read_gguf

    g = read_gguf(save_control_vector(tmp_path / "ours.gguf", {2: a}))
    assert g.version == 3 and g.fields["controlvector.layer_count"] == 1 and g.tensors[0].shape == (24,)


def _header(n_tensors=0, n_kv=0, version=3):
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def _s(text):
    return struct.pack("<Q", len(text)) + text


@pytest.mark.parametrize("data, message", [
    (b"GG", "does not start with"),
    (_header(version=1), "version 1"),
    (_header(n_tensors=1 << 60), "do not fit"),
    (_header(n_kv=1) + struct.pack("<Q", 1 << 62), "past the end"),
    (_header(n_kv=1) + _s(b"k") + struct.pack("<I", 99), "unknown value type 99"),
    (_header(n_kv=1) + _s(b"k") + struct.pack("<IIQ", 9, 4, 1 << 61), "past the end"),
    (_header(n_kv=1) + _s(b"k") + struct.pack("<IIQ", 9, 8, 1 << 40), "claims"),
    (_header(n_kv=1) + _s(b"k") + struct.pack("<I", 8) + _s(b"\xff\xfe"), "not UTF-8"),
    (_header(n_kv=1) + _s(b"general.alignment") + struct.pack("<II", 4, 3), "power of two"),
    (_header(n_tensors=1) + _s(b"direction.1") + struct.pack("<I", 5), "5 dimensions"),
    (_header(n_tensors=1) + _s(b"direction.1") + struct.pack("<IQIQ", 1, 1 << 50, 0, 0), "within the file"),
    (_header(n_tensors=1) + _s(b"direction.1") + struct.pack("<IQIQ", 1, 4, 0, 3) + b"\0" * 64, "within the file"),
    (_header(n_tensors=1) + _s(b"direction.1") + struct.pack("<IQIQ", 1, 4, 1, 0) + b"\0" * 64, r"not F32 \(type F16\)"),
    (_header(n_tensors=1) + _s(b"direction.1") + struct.pack("<IQQIQ", 2, 2, 2, 0, 0) + b"\0" * 64, "not 1-D"),
    (_header(n_tensors=2) + (_s(b"direction.1") + struct.pack("<IQIQ", 1, 4, 0, 0)) * 2 + b"\0" * 64, "twice"),
    (_header(n_tensors=1) + _s(b"token_embd") + struct.pack("<IQIQ", 1, 4, 0, 0) + b"\0" * 64, "unexpected tensor"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_damaged_files_name_the_problem(tmp_path, data, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=message):
        load_control_vector(path)


def test_truncated_and_corrupted_files_are_value_errors(tmp_path):
    """Every prefix of a valid file and 400 seeded byte corruptions: a clean result or a ValueError."""
    good = save_control_vector(tmp_path / "v.gguf", _directions(np.random.default_rng(4), layers=(1, 3)))
    data = good.read_bytes()
    bad = tmp_path / "bad.gguf"
    for n in range(len(data)):
        bad.write_bytes(data[:n])
        with pytest.raises(ValueError):
            load_control_vector(bad)
    rng = np.random.default_rng(5)
    for _ in range(400):
        buf = bytearray(data)
        for i in rng.integers(0, len(buf), size=rng.integers(1, 4)):
            buf[i] = rng.integers(0, 256)
        bad.write_bytes(bytes(buf))
        try:
            out = load_control_vector(bad)
        except ValueError:
            continue
        assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in out.values())


@pytest.mark.slow
def test_llama_cpp_applies_our_file_at_the_same_layer(tmp_path, smollm2_gguf, smollm2_hf, gguf):
    """A vector saved here, handed to llama.cpp the way its loader does, shifts llama.cpp's logits
    like adding it to the output of the same block in transformers (and unlike the neighbours)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    import torch

    hidden, n_layer, layer = 576, 30, 5
    vec = np.random.default_rng(3).standard_normal(hidden).astype(np.float32) * 2
    path = save_control_vector(tmp_path / "v.gguf", {layer: vec}, model_hint="llama")

    # llama.cpp's loader, independently of ours: direction.N goes to buffer row N-1.
    r = gguf.GGUFReader(str(path))
    buf = np.zeros((n_layer - 1, hidden), np.float32)
    for t in r.tensors:
        buf[int(t.name.split(".")[1]) - 1] += np.asarray(t.data, dtype=np.float32)

    llm = llama_cpp.Llama(str(smollm2_gguf), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    ids = llm.tokenize(b"The weather today is", add_bos=False)

    def cpp_logits():
        llm.reset()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm._ctx.ctx), True)
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])

    base = cpp_logits()
    ptr = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    assert llama_cpp.llama_set_adapter_cvec(llm._ctx.ctx, ptr, buf.size, hidden, 1, n_layer - 1) == 0
    shift_cpp = cpp_logits() - base

    def hf_logits(at=None):
        hook = None
        if at is not None:
            hook = smollm2_hf.model.layers[at].register_forward_hook(
                lambda mod, args, out: (out[0] + torch.from_numpy(vec),) + tuple(out[1:])
                if isinstance(out, tuple) else out + torch.from_numpy(vec))
        try:
            with torch.no_grad():
                return smollm2_hf(torch.tensor([ids])).logits[0].numpy()
        finally:
            if hook is not None:
                hook.remove()

    ref = hf_logits()

    def cos(a, b):
        return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))

    same, before, after = (cos(hf_logits(at) - ref, shift_cpp) for at in (layer, layer - 1, layer + 1))
    # llama.cpp runs Q4_1 weights with 8-bit activations, transformers dequantized fp32: close, not equal.
    assert same > 0.98, (same, before, after)
    assert same > max(before, after) + 0.03, (same, before, after)
