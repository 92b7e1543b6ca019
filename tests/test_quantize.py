"""RTN blockwise quantization: error bounds, and the packing as onnxruntime's MatMulNBits reads it."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from edgeact.converters.quantize import dequantize, quantize_blockwise, unpack_codes, zero_point_values

ort = pytest.importorskip("onnxruntime")

CASES = [(bits, bs, sym) for bits in (4, 8) for bs in (32, 64, 128) for sym in (False, True)]


def _weight(n, k, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    w[0] = np.abs(w[0])          # an all-positive row: the zero point must still be representable
    w[1, : min(k, 40)] = 0.0     # an all-zero block: scale 0 must not produce NaN
    return w


@pytest.mark.parametrize("bits,bs,sym", CASES)
def test_roundtrip_error_within_half_a_step(bits, bs, sym):
    w = _weight(37, 100)
    qw = quantize_blockwise(w, bits, bs, sym)
    blocks = -(-100 // bs)
    assert qw.B.shape == (37, blocks, bs * bits // 8) and qw.B.dtype == np.uint8
    assert qw.scales.shape == (37 * blocks,) and qw.scales.dtype == np.float32
    if sym:
        assert qw.zero_points is None
    else:
        assert qw.zero_points.shape == (37, -(-blocks // 2) if bits == 4 else blocks)
    err = np.abs(dequantize(qw) - w)
    scale = np.repeat(qw.scales.reshape(37, blocks), bs, axis=1)[:, :100]
    assert np.all(np.isfinite(err))
    assert np.all(err <= scale / 2 * (1 + 1e-5) + 1e-12)
    assert np.all(dequantize(qw)[1, : min(100, 40)] == 0.0)
    # Padding past K holds each block's zero point, so a kernel reading whole blocks adds nothing.
    padded = unpack_codes(qw).astype(np.float32) - zero_point_values(qw)[..., None]
    assert np.all(padded.reshape(37, -1)[:, 100:] == 0)


def test_packing_nibble_order():
    # Codes 0..15 along K in one block: element 2j sits in the low nibble of byte j.
    w = np.arange(32, dtype=np.float32)[None, :] % 16
    qw = quantize_blockwise(w, 4, 32, symmetric=False)
    assert qw.zero_points[0, 0] == 0 and np.isclose(qw.scales[0], 1.0)
    assert qw.B[0, 0, 0] == 0x10 and qw.B[0, 0, 1] == 0x32 and qw.B[0, 0, 7] == 0xFE


def _ort_matmulnbits(x, qw):
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))]
    inits = [helper.make_tensor("B", TensorProto.UINT8, qw.B.shape, qw.B.tobytes(), raw=True),
             helper.make_tensor("scales", TensorProto.FLOAT, qw.scales.shape, qw.scales.tobytes(), raw=True)]
    names = ["x", "B", "scales"]
    if qw.zero_points is not None:
        zp_type = TensorProto.FLOAT if qw.zero_points.dtype == np.float32 else TensorProto.UINT8
        inits.append(helper.make_tensor("zp", zp_type, qw.zero_points.shape, qw.zero_points.tobytes(), raw=True))
        names.append("zp")
    node = helper.make_node("MatMulNBits", names, ["y"], domain="com.microsoft", K=qw.K, N=qw.N, bits=qw.bits,
                            block_size=qw.block_size, accuracy_level=0)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("n,k", [(64, 128), (37, 100), (5, 300)])
@pytest.mark.parametrize("bits,bs,sym", CASES)
def test_layout_matches_onnxruntime_matmulnbits(n, k, bits, bs, sym):
    w = _weight(n, k, seed=n + k)
    x = np.random.default_rng(1).standard_normal((3, k)).astype(np.float32)
    qw = quantize_blockwise(w, bits, bs, sym)
    ref = x @ dequantize(qw).T
    got = _ort_matmulnbits(x, qw)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("n,k", [(64, 128), (37, 100)])
@pytest.mark.parametrize("bits,bs", [(4, 32), (4, 64), (4, 128)])
def test_float_zero_points_match_onnxruntime(n, k, bits, bs):
    w = _weight(n, k, seed=n + k)
    x = np.random.default_rng(1).standard_normal((3, k)).astype(np.float32)
    qw = quantize_blockwise(w, bits, bs, float_zero_points=True)
    ref = x @ dequantize(qw).T
    np.testing.assert_allclose(_ort_matmulnbits(x, qw), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_block_16_accepted_by_onnxruntime():
    w = _weight(8, 40)
    x = np.ones((2, 40), np.float32)
    qw = quantize_blockwise(w, 4, 16, False)
    np.testing.assert_allclose(_ort_matmulnbits(x, qw), x @ dequantize(qw).T, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kw,msg", [(dict(bits=3), "bits must be 4 or 8"), (dict(block_size=48), "block_size"),
                                    (dict(w=np.zeros(5)), "2-D")])
def test_bad_arguments(kw, msg):
    w = kw.pop("w", np.zeros((4, 32), np.float32))
    with pytest.raises(ValueError, match=msg):
        quantize_blockwise(w, **{"bits": 4, "block_size": 32, **kw})
