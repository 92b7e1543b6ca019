"""Native kernels: the C self-tests (x86 and, under qemu, aarch64) and
MatMulNBits through the test binary's file mode against numpy and onnxruntime."""
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

NATIVE = Path(__file__).resolve().parents[1] / "native"
SOURCES = [NATIVE / "src" / "threadpool.c", NATIVE / "src" / "platform.c",   # the kernels of native/sources.txt
           *[NATIVE / ln for ln in (NATIVE / "sources.txt").read_text().split() if ln.startswith("src/kernels/")],
           NATIVE / "tests" / "test_kernels.c"]
CFLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread"]


def _build(compiler, out, extra=()):
    cmd = [compiler, *CFLAGS, *extra, "-o", str(out), *map(str, SOURCES), "-lm"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"{compiler} failed:\n{res.stderr}"
    return out


@pytest.fixture(scope="module")
def native_bin(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc not found")
    return [str(_build("gcc", tmp_path_factory.mktemp("kernels") / "test_kernels"))]


@pytest.fixture(scope="module")
def arm_bin(tmp_path_factory):
    if shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which("qemu-aarch64") is None:
        pytest.skip("aarch64-linux-gnu-gcc or qemu-aarch64 not installed")
    return str(_build("aarch64-linux-gnu-gcc", tmp_path_factory.mktemp("kernels-arm") / "test_kernels",
                      ["-static"]))


def _run(cmd, isa=None, no_vnni=False, no_avx512=False):
    env = dict(os.environ)
    for k in ("EDGEACT_ISA", "EDGEACT_NO_VNNI", "EDGEACT_NO_AVX512"):
        env.pop(k, None)
    if isa:
        env["EDGEACT_ISA"] = isa
    if no_vnni:   # the AVX2 int matmul without vpdpbusd (the path of AVX2 CPUs that lack AVX-VNNI)
        env["EDGEACT_NO_VNNI"] = "1"
    if no_avx512:   # the AVX2 prefill GEMM on CPUs that have AVX-512 VNNI too
        env["EDGEACT_NO_AVX512"] = "1"
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


# default: every path this CPU has (AVX-512 VNNI prefill where present); then AVX-VNNI only;
# then plain AVX2; then the scalar reference itself
@pytest.mark.parametrize("isa,no_vnni,no_avx512", [(None, False, False), (None, False, True), (None, True, True),
                                                   ("scalar", False, False)])
def test_c_selftests_native(native_bin, isa, no_vnni, no_avx512):
    res = _run(native_bin, isa, no_vnni, no_avx512)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ok: 0 failure(s)" in res.stdout


@pytest.mark.qemu
@pytest.mark.parametrize("cpu,isa,expect", [
    ("max", None, "neon-dotprod"),
    ("max", "neon", "neon"),
    ("cortex-a57", None, "neon"),
])
def test_c_selftests_aarch64(arm_bin, cpu, isa, expect):
    res = _run(["qemu-aarch64", "-cpu", cpu, arm_bin], isa)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"testing isa {expect} against scalar" in res.stdout
    assert "ok: 0 failure(s)" in res.stdout


@pytest.mark.qemu
def test_forced_isa_unavailable_is_an_error(arm_bin):
    res = _run(["qemu-aarch64", "-cpu", "cortex-a57", arm_bin], "neon-dotprod")
    assert res.returncode == 3
    assert "not supported by this CPU" in res.stderr


def test_unknown_isa_is_an_error(native_bin):
    res = _run(native_bin, "sse9")
    assert res.returncode == 3 and "unknown ISA name" in res.stderr


# ---- MatMulNBits through the file mode --------------------------------------

def _random_weight(rng, K, N, bits, bs, has_zp):
    nb = -(-K // bs)
    q = rng.integers(0, 1 << bits, size=(N, nb * bs), dtype=np.uint8)
    q[:, K:] = 0  # the file pads K with zeros
    if bits == 4:
        packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
    else:
        packed = q
    scales = (rng.standard_normal((N, nb)) * 0.02).astype(np.float32)
    if has_zp:
        zp = rng.integers(0, 1 << bits, size=(N, nb), dtype=np.uint8)
        if bits == 4:
            zpad = np.zeros((N, 2 * (-(-nb // 2))), np.uint8)
            zpad[:, :nb] = zp
            zp_file = (zpad[:, 0::2] | (zpad[:, 1::2] << 4)).astype(np.uint8)
        else:
            zp_file = zp
    else:
        zp = np.full((N, nb), 8 if bits == 4 else 128, np.uint8)
        zp_file = None
    return q, packed, scales, zp, zp_file


def _quantize_rows(x, bs):
    """accuracy_level 4 activation quantization, in float32 like the kernels."""
    M, K = x.shape
    nb = -(-K // bs)
    xp = np.zeros((M, nb * bs), np.float32)
    xp[:, :K] = x
    blocks = xp.reshape(M, nb, bs)
    amax = np.abs(blocks).max(axis=2)
    scale = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):   # onnxruntime's MLAS: codes use 127/amax, not 1/scale
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    xq = np.clip(np.rint(blocks * inv[:, :, None]), -128, 127).astype(np.int64)
    return xq, scale


def _run_qmatmul(cmd, tmp_path, x, K, N, bits, bs, packed, scales, zp_file, threads, isa=None, mins=None):
    """The test binary's --qmatmul file mode: integer zero points (zp_file), float block minimums
    (mins, float32 [N, blocks]) or neither."""
    M = x.shape[0]
    inp, out = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(inp, "wb") as f:
        f.write(struct.pack("<7i", M, K, N, bits, bs, 2 if mins is not None else int(zp_file is not None), threads))
        f.write(np.ascontiguousarray(x, np.float32).tobytes())
        f.write(packed.tobytes())
        f.write(scales.tobytes())
        for extra in (zp_file, mins):
            if extra is not None:
                f.write(extra.tobytes())
    res = _run([*cmd, "--qmatmul", str(inp), str(out)], isa)
    assert res.returncode == 0, res.stderr
    return np.fromfile(out, np.float32).reshape(M, N), res.stderr


CASES = [  # M, K, N, bits, block_size, zero points, threads
    (1, 256, 64, 4, 32, False, 1),
    (1, 300, 77, 4, 32, True, 2),
    (4, 200, 45, 4, 64, True, 2),
    (3, 513, 33, 4, 128, False, 1),
    (1, 96, 40, 8, 32, True, 2),
    (5, 190, 29, 8, 64, False, 2),
    (2, 260, 18, 8, 128, True, 1),
]


def _check_against_numpy(y, x, q, scales, zp, K, bs):
    xq, sx = _quantize_rows(x, bs)
    M, nb = sx.shape
    N = q.shape[0]
    w_int = q.astype(np.int64).reshape(N, nb, bs) - zp.astype(np.int64)[:, :, None]
    idot = np.einsum("mbk,nbk->mnb", xq.reshape(M, nb, bs), w_int)  # exact integers
    terms = sx[:, None, :].astype(np.float64) * scales[None, :, :] * idot
    ref = terms.sum(axis=2)
    # Same integers and scales; only fp32 accumulation over blocks differs.
    tol = 4 * nb * np.finfo(np.float32).eps * np.abs(terms).sum(axis=2) + 1e-30
    assert np.all(np.abs(y - ref) <= tol), np.max(np.abs(y - ref) - tol)

    # Against the unquantized fp32 product: each activation moves by at most
    # half its block scale, so |error| <= sum_k |W[n,k]| * sx[m, k//bs] / 2.
    W = (w_int * scales[:, :, None]).reshape(N, nb * bs)[:, :K]
    exact = x.astype(np.float64) @ W.T
    half_step = np.repeat(sx, bs, axis=1)[:, :K] / 2
    bound = half_step @ np.abs(W).T * 1.001 + tol
    assert np.all(np.abs(y - exact) <= bound)
    assert np.any(np.abs(y - exact) > 0)  # the activations really were quantized


@pytest.mark.parametrize("M,K,N,bits,bs,has_zp,threads", CASES)
@pytest.mark.parametrize("isa", [None, "scalar"])
def test_qmatmul_file_mode_vs_numpy(native_bin, tmp_path, M, K, N, bits, bs, has_zp, threads, isa):
    rng = np.random.default_rng(K * 1000 + N)
    q, packed, scales, zp, zp_file = _random_weight(rng, K, N, bits, bs, has_zp)
    x = rng.standard_normal((M, K)).astype(np.float32)
    y, log = _run_qmatmul(native_bin, tmp_path, x, K, N, bits, bs, packed, scales, zp_file, threads, isa)
    if isa:
        assert f"isa={isa}" in log
    _check_against_numpy(y, x, q, scales, zp, K, bs)


@pytest.mark.qemu
@pytest.mark.parametrize("cpu", ["max", "cortex-a57"])
def test_qmatmul_file_mode_vs_numpy_aarch64(arm_bin, tmp_path, cpu):
    for M, K, N, bits, bs, has_zp, threads in CASES[1:6:2]:
        rng = np.random.default_rng(K + N)
        q, packed, scales, zp, zp_file = _random_weight(rng, K, N, bits, bs, has_zp)
        x = rng.standard_normal((M, K)).astype(np.float32)
        y, _ = _run_qmatmul(["qemu-aarch64", "-cpu", cpu, arm_bin], tmp_path, x, K, N, bits, bs,
                            packed, scales, zp_file, threads)
        _check_against_numpy(y, x, q, scales, zp, K, bs)


def _tie_heavy_rows(rng, M, K, bs):
    """Rows like an RMS-normed Q8_0/fp16 embedding: small odd multiples of d with
    254*d in every block, so x*127/amax lands exactly on .5 ties in exact
    arithmetic and the float rounding of the inverse scale decides each code."""
    d = np.float32(0.0937)
    x = (2 * rng.integers(-60, 60, size=(M, K)) + 1).astype(np.float32) * d
    x[:, ::bs] = 254 * d
    return x


def _ort_case(rows):
    """x, the weight and onnxruntime's com.microsoft.MatMulNBits (accuracy_level 4) on them."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    M, K, N, bits, bs = 3, 320, 48, 4, 32
    rng = np.random.default_rng(7)
    q, packed, scales, zp, zp_file = _random_weight(rng, K, N, bits, bs, True)
    x = rng.standard_normal((M, K)).astype(np.float32) if rows == "gaussian" else _tie_heavy_rows(rng, M, K, bs)
    if rows == "ties":   # the two ways of computing the inverse scale really disagree on these rows
        amax = np.float32(254 * np.float32(0.0937))
        inv = np.float32(127) / amax
        assert np.any(np.rint(x * inv) != np.rint(x * (np.float32(1) / (amax / np.float32(127)))))
        # ... and many products are exact halves, where ties-to-even and ties-away differ
        t = x * inv
        assert np.count_nonzero((t - np.floor(t) == 0.5) & (np.floor(t) % 2 == 0)) >= 10
    nb = -(-K // bs)
    node = helper.make_node("MatMulNBits", ["x", "B", "scales", "zp"], ["y"], domain="com.microsoft",
                            K=K, N=N, bits=bits, block_size=bs, accuracy_level=4)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, N])],
        initializer=[numpy_helper.from_array(packed.reshape(N, nb, bs // 2), "B"),
                     numpy_helper.from_array(scales.reshape(-1), "scales"),
                     numpy_helper.from_array(zp_file.reshape(-1), "zp")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(x=x, K=K, N=N, bits=bits, bs=bs, q=q, packed=packed, scales=scales, zp=zp, zp_file=zp_file,
                y_ort=sess.run(None, {"x": x})[0])


def _check_against_ort(y, c):
    # Same int8 activations and integer dots; onnxruntime accumulates blocks in its own fp32 order
    # and adds the zero-point term in float (block sums). One activation code off moves an output
    # by about scale_x*|w| (~3e-2 here), 20x this bound (1e-5 of the sum of |terms|, ~1.6e-3).
    q, zp, scales, bs, K = c["q"], c["zp"], c["scales"], c["bs"], c["K"]
    scale_of_sum = np.abs(c["x"]) @ np.abs(((q.astype(np.float32) - np.repeat(zp, bs, 1)) *
                                            np.repeat(scales, bs, 1))[:, :K]).T
    err = np.abs(y - c["y_ort"])
    assert np.all(err <= 1e-5 * scale_of_sum + 1e-6), (np.max(err), int(np.count_nonzero(err > 1e-5 * scale_of_sum)))


# isa None: the best this CPU has (its own quantizer); "scalar": the C reference quantizer
# (nearbyintf), which is the production quantizer on NEON.
@pytest.mark.parametrize("isa", [None, "scalar"])
@pytest.mark.parametrize("rows", ["gaussian", "ties"])
def test_qmatmul_matches_onnxruntime(native_bin, tmp_path, rows, isa):
    """The reference the runtime is judged by: com.microsoft.MatMulNBits, accuracy_level 4."""
    c = _ort_case(rows)
    y, _ = _run_qmatmul(native_bin, tmp_path, c["x"], c["K"], c["N"], c["bits"], c["bs"], c["packed"],
                        c["scales"], c["zp_file"], 2, isa)
    _check_against_ort(y, c)


@pytest.mark.qemu
@pytest.mark.parametrize("cpu", ["max", "cortex-a57"])   # NEON dotprod, plain NEON
def test_qmatmul_matches_onnxruntime_aarch64(arm_bin, tmp_path, cpu):
    """The tie rule on aarch64, where the scalar quantizer feeds the NEON kernels: onnxruntime's
    x86 result is the reference (its quantizer rounds ties to even on every platform)."""
    c = _ort_case("ties")
    y, _ = _run_qmatmul(["qemu-aarch64", "-cpu", cpu, arm_bin], tmp_path, c["x"], c["K"], c["N"], c["bits"],
                        c["bs"], c["packed"], c["scales"], c["zp_file"], 2)
    _check_against_ort(y, c)


# ---- activation-sparse GEMV through the file mode ---------------------------

def _run_sparse(cmd, tmp_path, x, K, N, bs, packed, scales, zp_file, active, threads, isa=None):
    inp, out = tmp_path / "sparse_in.bin", tmp_path / "sparse_out.bin"
    with open(inp, "wb") as f:
        f.write(struct.pack("<6i", K, N, bs, int(zp_file is not None), threads, len(active)))
        f.write(np.ascontiguousarray(x, np.float32).tobytes())
        f.write(packed.tobytes())
        f.write(scales.tobytes())
        if zp_file is not None:
            f.write(zp_file.tobytes())
        f.write(np.asarray(active, np.int32).tobytes())
    res = _run([*cmd, "--sparse", str(inp), str(out)], isa)
    assert res.returncode == 0, res.stderr
    return np.fromfile(out, np.float32).reshape(1, N)


@pytest.mark.parametrize("K,N,bs,has_zp,active_frac,threads", [
    (300, 77, 32, True, 0.3, 2),
    (512, 96, 64, False, 0.5, 1),
    (640, 50, 128, True, 0.1, 2),
    (257, 33, 32, False, 0.9, 2),
])
@pytest.mark.parametrize("isa", [None, "scalar"])
@pytest.mark.parametrize("rows", ["gaussian", "ties"])
def test_sparse_gemv_file_mode_vs_numpy(native_bin, tmp_path, K, N, bs, has_zp, active_frac, threads, isa, rows):
    """y = MatMulNBits(x with inactive channels zeroed): the numpy reference
    quantizes the masked x, exactly what the dense kernel would see. Tie rows pin the
    sparse quantizer's own rounding (ties to even, as numpy's rint and onnxruntime)."""
    rng = np.random.default_rng(K + N + bs)
    q, packed, scales, zp, zp_file = _random_weight(rng, K, N, 4, bs, has_zp)
    x = rng.standard_normal((1, K)).astype(np.float32) if rows == "gaussian" else _tie_heavy_rows(rng, 1, K, bs)
    active = np.flatnonzero((rng.random(K) < active_frac) | (rows == "ties") & (np.arange(K) % bs == 0))
    y = _run_sparse(native_bin, tmp_path, x, K, N, bs, packed, scales, zp_file, active, threads, isa)
    x_masked = np.zeros_like(x)
    x_masked[:, active] = x[:, active]
    _check_against_numpy(y, x_masked, q, scales, zp, K, bs)
    y_dense, _ = _run_qmatmul(native_bin, tmp_path, x_masked, K, N, 4, bs, packed, scales, zp_file, threads, isa)
    assert np.array_equal(y, y_dense)  # bit-identical to the dense kernel on the masked input


@pytest.mark.qemu
@pytest.mark.parametrize("cpu", ["max", "cortex-a57"])
def test_sparse_gemv_file_mode_aarch64(arm_bin, tmp_path, cpu):
    K, N, bs = 300, 77, 32
    rng = np.random.default_rng(11)
    q, packed, scales, zp, zp_file = _random_weight(rng, K, N, 4, bs, True)
    x = rng.standard_normal((1, K)).astype(np.float32)
    active = np.flatnonzero(rng.random(K) < 0.4)
    y = _run_sparse(["qemu-aarch64", "-cpu", cpu, arm_bin], tmp_path, x, K, N, bs, packed, scales, zp_file,
                    active, 2)
    x_masked = np.zeros_like(x)
    x_masked[:, active] = x[:, active]
    _check_against_numpy(y, x_masked, q, scales, zp, K, bs)
    # tie rows (each block's amax channel kept active): the NEON build's sparse quantizer rounds ties to even
    xt = _tie_heavy_rows(rng, 1, K, bs)
    active = np.flatnonzero((rng.random(K) < 0.6) | (np.arange(K) % bs == 0))
    y = _run_sparse(["qemu-aarch64", "-cpu", cpu, arm_bin], tmp_path, xt, K, N, bs, packed, scales, zp_file,
                    active, 2)
    x_masked = np.zeros_like(xt)
    x_masked[:, active] = xt[:, active]
    _check_against_numpy(y, x_masked, q, scales, zp, K, bs)
