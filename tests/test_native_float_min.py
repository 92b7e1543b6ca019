"""Float block minimums (MatMulNBits float zero points) in the native kernels. native/tests/
test_kernels.c checks every ISA bit for bit against the scalar reference; here the kernels (through
the test binary's file mode, x86 and NEON under qemu) against numpy, and sparse folders (TEAL,
CATS) whose matmuls run the sparse kernels with the minimums, giving the dense kernels' bits on the
masked input and staying near onnxruntime."""
import json

import numpy as np
import pytest
from test_native_kernels import _quantize_rows, _run_qmatmul, arm_bin, native_bin  # noqa: F401 (fixtures)

from edgeact.engines import native_available


def _weight(rng, K, N, bits, bs, f16):
    nb = -(-K // bs)
    q = rng.integers(0, 1 << bits, size=(N, nb * bs), dtype=np.uint8)
    q[:, K:] = 0
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8) if bits == 4 else q
    scales = (np.abs(rng.standard_normal((N, nb))) * 0.02).astype(np.float16).astype(np.float32)
    mins = (-scales * rng.uniform(0, (1 << bits) - 1, size=(N, nb))).astype(np.float32)
    if f16:
        mins = mins.astype(np.float16).astype(np.float32)
    return q, packed, scales, mins


def _check(y, x, q, scales, mins, K, bs):
    """The kernel's product is that of the weight q*scale + minimum and the int8 activations: the
    minimum times the block's sum of quantized activations (sx * sumx)."""
    xq, sx = _quantize_rows(x, bs)
    M, nb = sx.shape
    N = q.shape[0]
    idot = np.einsum("mbk,nbk->mnb", xq.reshape(M, nb, bs), q.astype(np.int64).reshape(N, nb, bs))
    xsum = (sx * xq.sum(axis=2)).astype(np.float32).astype(np.float64)  # sx*sumx, rounded as the kernel does
    terms = sx[:, None, :].astype(np.float64) * scales[None] * idot + mins[None].astype(np.float64) * xsum[:, None]
    ref = terms.sum(axis=2)
    tol = 6 * nb * np.finfo(np.float32).eps * (np.abs(sx[:, None, :] * scales[None] * idot) +
                                               np.abs(mins[None] * xsum[:, None])).sum(axis=2) + 1e-30
    assert np.all(np.abs(y - ref) <= tol), np.max(np.abs(y - ref) - tol)
    # against the float product: each activation moves by at most half its block's step
    W = (q.astype(np.float64).reshape(N, nb, bs) * scales[:, :, None] + mins[:, :, None]).reshape(N, -1)[:, :K]
    bound = np.repeat(sx, bs, axis=1)[:, :K] / 2 @ np.abs(W).T * 1.001 + tol
    assert np.all(np.abs(y - x.astype(np.float64) @ W.T) <= bound)


MIN_CASES = [  # M, K, N, bits, block_size, fp16 minimums, threads
    (1, 300, 77, 4, 32, True, 2),
    (1, 256, 64, 4, 32, False, 1),
    (4, 200, 45, 4, 64, True, 2),
    (3, 513, 33, 4, 128, False, 2),
    (2, 190, 29, 8, 64, True, 1),
]


@pytest.mark.parametrize("M,K,N,bits,bs,f16,threads", MIN_CASES)
@pytest.mark.parametrize("isa", [None, "avx2", "scalar"])
def test_minimums_file_mode_vs_numpy(native_bin, tmp_path, M, K, N, bits, bs, f16, threads, isa):
    import platform

    if isa == "avx2" and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 only")
    rng = np.random.default_rng(K * 7 + N)
    q, packed, scales, mins = _weight(rng, K, N, bits, bs, f16)
    x = rng.standard_normal((M, K)).astype(np.float32)
    y, log = _run_qmatmul(native_bin, tmp_path, x, K, N, bits, bs, packed, scales, None, threads, isa, mins)
    if isa:
        assert f"isa={isa}" in log
    _check(y, x, q, scales, mins, K, bs)


@pytest.mark.qemu
@pytest.mark.parametrize("cpu", ["max", "cortex-a57"])
def test_minimums_file_mode_vs_numpy_aarch64(arm_bin, tmp_path, cpu):
    for M, K, N, bits, bs, f16, threads in MIN_CASES[::2]:
        rng = np.random.default_rng(K + N)
        q, packed, scales, mins = _weight(rng, K, N, bits, bs, f16)
        x = rng.standard_normal((M, K)).astype(np.float32)
        y, _ = _run_qmatmul(["qemu-aarch64", "-cpu", cpu, arm_bin], tmp_path, x, K, N, bits, bs, packed, scales,
                            None, threads, mins=mins)
        _check(y, x, q, scales, mins, K, bs)


@pytest.mark.skipif(not native_available(), reason="native runtime not built")
@pytest.mark.parametrize("method", ["teal", "cats"])
def test_sparse_folder_with_float_minimums(tmp_path, tiny_hf_dir, monkeypatch, capsys, method):
    """Float-minimum linears behind a Sparsify (TEAL: the input-sparse GEMV, q/k/v and gate/up
    stacked; CATS: up_proj's output rows and down_proj's input-sparse GEMV) run the sparse kernels,
    give the bits of the dense kernel on the masked input, and stay near onnxruntime; the
    converter has nothing to warn about."""
    import edgeact
    from edgeact.cli import main
    from edgeact.evaluate import compare_logits

    out = tmp_path / f"imx-{method}"
    assert main(["convert", str(tiny_hf_dir), "-o", str(out), "--method", "imatrix", "--sparsity", "0.5",
                 "--sparsity-method", method, "--calib-tokens", "64", "--quiet"]) == 0
    meta = json.loads((out / "edgeact.json").read_text())
    assert meta["quantization"]["method"] == "imatrix" and meta["sparsity"]["method"] == method
    assert meta["quantization"]["float_zero_point_linears"] == 14   # 7 linears x 2 layers; lm_head not counted
    assert "warning" not in capsys.readouterr().err
    ids = [1, 5, 9, 33, 2, 70, 11, 4, 19, 23, 8, 3]

    def decode(env, low_memory=False):
        for k in ("EDGEACT_SPARSE_ALWAYS", "EDGEACT_SPARSE_STATIC"):
            monkeypatch.delenv(k, raising=False)
        monkeypatch.setenv(env, "1")
        eng = edgeact.load(out, engine="native", low_memory=low_memory).engine
        full = eng.forward(ids)
        eng.reset()
        eng.forward(ids[:6])
        eng.session.profile(True)
        dec = np.concatenate([eng.forward(ids[i:i + 1]) for i in range(6, len(ids))])
        recs = [r for r in eng.session.profile_records() if r["op_type"] == "MatMulNBits" and r["total"] == 0]
        return full, dec, {r["name"]: (r["sparse_calls"], r["calls"]) for r in recs}

    full, always, paths = decode("EDGEACT_SPARSE_ALWAYS")   # every matmul that can go sparse does
    sparse_steps = sorted({n.rsplit(".", 1)[-1] for n, (sp, calls) in paths.items() if sp == calls == 6})
    want = ["down_proj", "up_proj"] if method == "cats" else \
        ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert sparse_steps == want, sorted(paths.items())
    assert np.abs(always - full[6:]).max() <= 1e-4
    # the fixed rule: the tiny model's widths sit below the sparse kernels' minimum, so the dense
    # kernel on the masked input (CATS: all rows), which the sparse kernels match bit for bit
    _, static, paths = decode("EDGEACT_SPARSE_STATIC")
    assert all(sp == 0 for sp, _ in paths.values()), paths
    assert np.array_equal(static, always)
    if method == "teal":   # low memory: no dense repack, every row on the channel-major copy
        low_full, low, _ = decode("EDGEACT_SPARSE_ALWAYS", low_memory=True)
        assert np.array_equal(low, always)
        np.testing.assert_allclose(low_full, full, rtol=0, atol=1e-4 * np.abs(full).max())
    ort = edgeact.load(out, engine="ort").forward(ids)
    assert compare_logits(full, ort, ids).kl < 0.01


@pytest.mark.skipif(not native_available(), reason="native runtime not built")
def test_coreinfer_folder_with_float_minimums(tmp_path, tiny_hf_dir, monkeypatch):
    """CoreInfer: once the prompt fixed the masks, gate/up run on copies of their kept rows, which
    carry the rows' minimums (read back from the repack); decode stays near onnxruntime's with the
    same masks."""
    import edgeact
    from edgeact.cli import main
    from edgeact.evaluate import compare_logits

    out = tmp_path / "imx-coreinfer"
    assert main(["convert", str(tiny_hf_dir), "-o", str(out), "--method", "imatrix", "--sparsity", "0.5",
                 "--sparsity-method", "coreinfer", "--quiet"]) == 0
    assert json.loads((out / "edgeact.json").read_text())["quantization"]["float_zero_point_linears"] == 14
    ids = [1, 5, 9, 33, 2, 70, 11, 4, 19, 23, 8, 3]
    monkeypatch.setenv("EDGEACT_SPARSE_STATIC", "1")   # down_proj dense: its bytes are the full weight's
    n, o = edgeact.load(out, engine="native").engine, edgeact.load(out, engine="ort").engine
    n.forward(ids[:6]), o.forward(ids[:6])
    o.core_masks = n.core_masks   # the int8 activations may tip a tie of onnxruntime's float ones
    o.set_neuron_masks(n.core_masks)
    n.session.profile(True)
    ln = np.concatenate([n.forward(ids[i:i + 1]) for i in range(6, len(ids))])
    lo = np.concatenate([o.forward(ids[i:i + 1]) for i in range(6, len(ids))])
    read = {}
    for r in n.session.profile_records():
        if r["op_type"] == "MatMulNBits" and r["name"].rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj"):
            read.setdefault(r["name"].rsplit(".", 1)[-1], []).append(r["weight_bytes"])
    # gate/up as large as down_proj: their kept-row copies read about half its bytes
    for layer, down in enumerate(read["down_proj"]):
        assert read["gate_proj"][layer] < 0.6 * down and read["up_proj"][layer] < 0.6 * down, read
    assert compare_logits(ln, lo, ids[6:] + [0]).kl < 0.01
    # the kept rows' minimums are the rows' own: without the copies, gate/up run the full dense
    # GEMV (the same kernel on the same rows, the others masked), and decode gives the same bits
    monkeypatch.setenv("EDGEACT_NO_KEPT_ROWS", "1")
    d = edgeact.load(out, engine="native").engine
    d.forward(ids[:6])
    d.session.profile(True)
    assert np.array_equal(np.concatenate([d.forward(ids[i:i + 1]) for i in range(6, len(ids))]), ln)
    full = [r["weight_bytes"] for r in d.session.profile_records() if r["name"].endswith("gate_proj")]
    assert full and all(b > 1.6 * k for b, k in zip(full, read["gate_proj"])), (full, read["gate_proj"])


@pytest.mark.skipif(not native_available(), reason="native runtime not built")
def test_float_activations_with_float_minimums(tmp_path, tiny_hf_dir):
    """accuracy_level 1: float activations against fma(q, scale, minimum) from the file layout,
    which is onnxruntime's float computation up to summation order."""
    import edgeact
    from edgeact.cli import main

    out = tmp_path / "imx-acc1"
    assert main(["convert", str(tiny_hf_dir), "-o", str(out), "--method", "imatrix", "--accuracy-level", "1",
                 "--calib-tokens", "64", "--quiet"]) == 0
    ids = [1, 5, 9, 33, 2, 70, 11, 4]
    n = edgeact.load(out, engine="native").forward(ids)
    o = edgeact.load(out, engine="ort").forward(ids)
    np.testing.assert_allclose(n, o, rtol=0, atol=1e-5 * np.abs(o).max())
