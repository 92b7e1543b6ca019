"""The native loader rejects bad model files one problem at a time, each with a
clear one-line error naming the node or initializer, never crashing."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

runtime = pytest.importorskip("edgeact.runtime")
if not runtime.available():
    pytest.skip(runtime.unavailable_reason(), allow_module_level=True)
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from edgeact.converters.convert import convert  # noqa: E402
from edgeact.converters.random_model import random_source  # noqa: E402
from edgeact.runtime import ModelFormatError, NativeModel  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    src = random_source("tiny", seed=0)
    return {"fp32": convert(src, root / "fp32", quant="fp32", progress=False),
            "int4": convert(src, root / "int4", quant="int4", progress=False),
            "ext": convert(src, root / "ext", quant="int4", external_data=True, progress=False)}


def _edit(folder, tmp_path, edit, name="m"):
    """Copy the folder, apply edit(ModelProto) and save model.onnx (external data left as is)."""
    out = tmp_path / name
    shutil.copytree(folder, out)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    edit(model)
    (out / "model.onnx").write_bytes(model.SerializeToString())
    return out


def _load_error(folder, exc=ModelFormatError) -> str:
    with pytest.raises(exc) as e:
        NativeModel(folder)
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def _node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def _init(model, name):
    return next(t for t in model.graph.initializer if t.name == name)


def test_valid_folders_load(base):
    for f in base.values():
        m = NativeModel(f)
        assert m.n_layers == 2 and m.vocab == 300 and m.n_steer_layers == 2
    ext = NativeModel(base["ext"])
    # 64-byte aligned external data is used in place; only vectors (norm weights) are copied
    assert 0 < ext.weight_bytes["copied"] <= 16 * 1024 < ext.weight_bytes["mapped"], ext.weight_bytes


def test_truncated_files(base, tmp_path):
    data = (base["int4"] / "model.onnx").read_bytes()
    rng = np.random.default_rng(0)
    cuts = sorted({0, 1, 2, 7, len(data) // 2, len(data) - 1, *rng.integers(1, len(data), 40).tolist()})
    for cut in cuts:
        with pytest.raises((ModelFormatError, ValueError)) as e:
            NativeModel.from_bytes(data[:cut])
        assert str(e.value), cut


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.onnx"):
        NativeModel(tmp_path)


def test_wrong_input_type(base, tmp_path):
    def edit(m):
        m.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT
    assert "graph input 'input_ids' must be int64, the graph declares float32" in _load_error(
        _edit(base["fp32"], tmp_path, edit))


def test_weight_of_wrong_dtype(base, tmp_path):
    def edit(m):
        t = _init(m, "model.layers.0.mlp.gate_proj.weight")
        arr = onnx.numpy_helper.to_array(t).astype(np.int32)
        t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
    msg = _load_error(_edit(base["fp32"], tmp_path, edit))
    assert "node 'layers.0.mlp.gate_proj' (MatMul)" in msg and "int32" in msg


def test_dims_that_do_not_match_the_data(base, tmp_path):
    def edit(m):
        _init(m, "model.norm.weight").dims[0] = 1 << 30
    assert "initializer 'model.norm.weight'" in _load_error(_edit(base["fp32"], tmp_path, edit))


def test_negative_dim(base, tmp_path):
    def edit(m):
        _init(m, "cos_cache").dims[0] = -5
    assert "initializer 'cos_cache': dimension 0 is -5" in _load_error(_edit(base["fp32"], tmp_path, edit))


def test_matmulnbits_attributes_vs_weight_shapes(base, tmp_path):
    def edit(m):
        for a in _node(m, "layers.1.mlp.up_proj").attribute:
            if a.name == "N":
                a.i += 1
    msg = _load_error(_edit(base["int4"], tmp_path, edit))
    assert "node 'layers.1.mlp.up_proj' (com.microsoft.MatMulNBits)" in msg and "B '" in msg


SCALES = "model.layers.1.mlp.up_proj.weight.scales"


def test_fp16_scales_behind_a_cast(base):
    """Block scales exact in fp16 are stored fp16 and cast to float32 in the graph; the loader converts
    them once and drops the copy when the repack holds them (nothing is left copied but vectors)."""
    m = onnx.load(str(base["int4"] / "model.onnx"))
    assert _init(m, SCALES).data_type == TensorProto.FLOAT16
    cast = _node(m, SCALES + ".cast")
    assert cast.op_type == "Cast" and _node(m, "layers.1.mlp.up_proj").input[2] == cast.output[0]
    # aligned external data: only the vectors (norm weights, steering defaults) stay copied, not the scales
    ext = onnx.load(str(base["ext"] / "model.onnx"))
    vectors = sum(onnx.numpy_helper.to_array(t, base_dir=str(base["ext"])).nbytes for t in ext.graph.initializer
                  if len(t.dims) <= 1 and t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)
                  and not t.name.endswith(".scales"))
    assert NativeModel(base["ext"]).weight_bytes["copied"] == vectors > 0


def test_scales_cast_to_another_type(base, tmp_path):
    def edit(m):
        next(a for a in _node(m, SCALES + ".cast").attribute if a.name == "to").i = TensorProto.FLOAT16
    msg = _load_error(_edit(base["int4"], tmp_path, edit))
    assert msg.startswith(f"node '{SCALES}.cast' (Cast): cast to type 10 is not supported (only to float32)"), msg


def test_scales_cast_from_an_integer_initializer(base, tmp_path):
    def edit(m):
        t = _init(m, SCALES)
        t.CopyFrom(onnx.numpy_helper.from_array(np.ones(onnx.numpy_helper.to_array(t).shape, np.uint8), t.name))
    msg = _load_error(_edit(base["int4"], tmp_path, edit))
    assert msg == f"node '{SCALES}.cast' (Cast): cast of initializer '{SCALES}' of type uint8 is not supported", msg


def test_scales_cast_from_an_activation(base, tmp_path):
    def edit(m):
        _node(m, SCALES + ".cast").input[0] = "layers.1.ffn_norm"
    msg = _load_error(_edit(base["int4"], tmp_path, edit))
    assert msg == (f"node 'layers.1.mlp.up_proj' (com.microsoft.MatMulNBits): input 2 '{SCALES}.f32' must be an "
                   "initializer"), msg


def _float_minimum_folder(tmp_path):
    """A tied tiny model from a GGUF whose up_proj is Q4_1: its float zero points are Div(Cast(-minimum),
    Cast(scale)) of fp16 initializers."""
    from test_gguf_import import _write_quantized_gguf

    src = random_source("tiny", seed=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
                        head_dim=16, tie_word_embeddings=True)
    types = {p: "Q4_0" for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj")}
    _write_quantized_gguf(tmp_path / "m.gguf", src, {**types, "up_proj": "Q4_1"})
    return convert(tmp_path / "m.gguf", tmp_path / "src", quant="source", progress=False)


def test_float_zero_points_folded_from_fp16_minimums(tmp_path):
    folder = _float_minimum_folder(tmp_path)
    m = onnx.load(str(folder / "model.onnx"))
    zp = "model.layers.1.mlp.up_proj.weight.zero_points"
    div = next(n for n in m.graph.node if n.output[0] == zp)
    assert div.op_type == "Div" and _init(m, zp[: -len("zero_points")] + "neg_minimums").data_type == TensorProto.FLOAT16
    NativeModel(folder)

    def divisor_too_short(m):   # the scales' Cast replaced by a 3-element initializer
        _node(m, div.name).input[1] = "short"
        m.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(3, np.float32), "short"))
    msg = _load_error(_edit(folder, tmp_path, divisor_too_short, "short"))
    assert msg.startswith(f"node '{div.name}' (Div): initializers ") and "must have the same size" in msg, msg

    def integer_dividend(m):
        t = _init(m, div.input[0][: -len(".f32")])   # the fp16 minimums behind their Cast
        _node(m, div.name).input[0] = t.name + ".u8"
        m.graph.initializer.append(onnx.numpy_helper.from_array(
            np.ones(onnx.numpy_helper.to_array(t).shape, np.uint8), t.name + ".u8"))
    msg = _load_error(_edit(folder, tmp_path, integer_dividend, "u8"))
    assert msg.startswith(f"node '{div.name}' (Div): dividing initializer ") and "uint8 is not supported" in msg, msg


def test_unknown_attribute_value(base, tmp_path):
    def edit(m):
        for a in _node(m, "layers.0.attn.gqa").attribute:
            if a.name == "rotary_interleaved":
                a.i = 1
    assert "node 'layers.0.attn.gqa' (com.microsoft.GroupQueryAttention): rotary_interleaved=1 is not supported" \
        == _load_error(_edit(base["int4"], tmp_path, edit))


def test_unknown_op(base, tmp_path):
    def edit(m):
        _node(m, "layers.0.mlp.sigmoid").op_type = "HardSigmoid"
    msg = _load_error(_edit(base["fp32"], tmp_path, edit))
    assert msg.startswith("node 'layers.0.mlp.sigmoid' (HardSigmoid): op type 'HardSigmoid' is not supported")


def test_dangling_edge(base, tmp_path):
    def edit(m):
        _node(m, "layers.1.attn.residual").input[1] = "nowhere"
    assert "node 'layers.1.attn.residual' (Add): input 'nowhere' is dangling" in _load_error(
        _edit(base["fp32"], tmp_path, edit))


def test_cycle(base, tmp_path):
    def edit(m):   # the first layer's norm reads the last layer's output
        _node(m, "layers.0.attn_norm").input[0] = "hidden.1"
    msg = _load_error(_edit(base["fp32"], tmp_path, edit))
    assert "node 'layers.0.attn_norm' (RMSNormalization): input 'hidden.1' is produced by node 'layers.1.steer'" in msg
    assert "cycle" in msg


def test_duplicate_output(base, tmp_path):
    def edit(m):
        _node(m, "layers.1.mlp.residual").output[0] = "layers.0.mlp.residual"
    assert "already defined" in _load_error(_edit(base["fp32"], tmp_path, edit))


def test_steer_vector_shape(base, tmp_path):
    def edit(m):
        t = _init(m, "steer.1.add")
        t.CopyFrom(onnx.numpy_helper.from_array(np.zeros(47, np.float32), t.name))
    assert "node 'layers.1.steer' (ai.edgeact.Steer)" in _load_error(_edit(base["fp32"], tmp_path, edit))


def _ext_tensor(m):
    return next(t for t in m.graph.initializer if t.data_location == TensorProto.EXTERNAL)


def _set_ext(t, key, value):
    for e in t.external_data:
        if e.key == key:
            e.value = value
            return
    t.external_data.add(key=key, value=value)


@pytest.mark.parametrize("key,value,expect", [
    ("offset", str(10 ** 9), "exceeds"),
    ("length", "12", "does not match its dims"),
    ("offset", "-3", "not a non-negative integer"),
    ("location", "../model.onnx.data", "leaves the model folder"),
    ("location", "/etc/passwd", "must be a relative path"),
    ("location", "missing.data", "not found in the model folder"),
])
def test_external_data_checks(base, tmp_path, key, value, expect):
    def edit(m):
        _set_ext(_ext_tensor(m), key, value)
    msg = _load_error(_edit(base["ext"], tmp_path, edit))
    assert msg.startswith("initializer '") and expect in msg


def test_external_data_symlink_out_of_folder(base, tmp_path):
    outside = tmp_path / "outside.data"
    shutil.copy(base["ext"] / "model.onnx.data", outside)

    def edit(m):
        _set_ext(_ext_tensor(m), "location", "link.data")
    folder = _edit(base["ext"], tmp_path, edit)
    os.symlink(outside, folder / "link.data")
    assert "resolves outside the model folder" in _load_error(folder)


def test_initializer_without_raw_data_layout(base, tmp_path):
    def edit(m):
        t = _init(m, "model.norm.weight")
        vals = onnx.numpy_helper.to_array(t)
        t.ClearField("raw_data")
        t.data_type = TensorProto.FLOAT
        t.float_data.extend((vals * 1.5).tolist())   # packed float_data, other values than raw_data had
    m = NativeModel(_edit(base["fp32"], tmp_path, edit))
    assert m.vocab == 300
    # the values are read, not only the shape: the same logits as the raw_data file with those values
    def scaled(mp):
        t = _init(mp, "model.norm.weight")
        t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t) * 1.5, t.name))
    ref = NativeModel(_edit(base["fp32"], tmp_path, scaled, name="ref"))
    orig = NativeModel(base["fp32"])
    ids = np.array([1, 5, 9, 200, 3], np.int64)
    got = m.session(threads=1).forward(ids, all_logits=True)
    assert np.array_equal(got, ref.session(threads=1).forward(ids, all_logits=True))
    assert not np.allclose(got, orig.session(threads=1).forward(ids, all_logits=True))
