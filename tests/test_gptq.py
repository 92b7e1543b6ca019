"""--method gptq / awq+gptq: error-compensating rounding lowers a layer's output error against
round-to-nearest on the same calibration inputs, reduces to round-to-nearest when the inputs are
uncorrelated, matches a plain column-by-column reference of the algorithm, packs into the
MatMulNBits layout exactly as it computed, and writes folders both engines run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgeact.converters.gptq import DAMP, gptq_quantize, output_error, pack, rtn
from edgeact.converters.quantize import dequantize, fp16_exact, quantize_blockwise, unpack_codes

FORMATS = [(4, False, False), (4, True, False), (4, False, True), (8, False, False), (8, True, False)]


def _layer(T=384, K=256, N=48, seed=0):
    """Correlated calibration inputs (as a real layer's are) and a weight with a few outlier columns."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g) @ (torch.eye(K) + 0.3 * torch.randn(K, K, generator=g) / K ** 0.5)
    x[:, :4] *= 8.0
    w = torch.randn(N, K, generator=g) * 0.05
    return x, w, (x.T @ x).double()


@pytest.mark.parametrize("bits, symmetric, fzp", FORMATS)
@pytest.mark.parametrize("group", [32, 128])
def test_lower_output_error_than_rtn(bits, symmetric, fzp, group):
    x, w, H = _layer()
    _, _, _, wq = gptq_quantize(w, H, bits, group, symmetric=symmetric, float_zero_points=fzp)
    e_rtn = float(((x @ (rtn(w, bits, group, symmetric, fzp) - w).T) ** 2).sum())
    e_gptq = float(((x @ (wq - w).T) ** 2).sum())
    # measured 0.35-0.45x on this layer; round-to-nearest itself would be 1x
    assert e_gptq < 0.6 * e_rtn, (e_gptq, e_rtn)
    assert output_error(wq - w, H) == pytest.approx(e_gptq, rel=1e-3)


@pytest.mark.parametrize("bits, symmetric, fzp", FORMATS)
@pytest.mark.parametrize("K, group, act_order", [(100, 32, False), (192, 64, True), (300, 128, False)])
def test_packed_weight_decodes_to_what_gptq_computed(bits, symmetric, fzp, K, group, act_order):
    x, w, H = _layer(K=K, N=24, seed=K)
    codes, scale, zp, wq = gptq_quantize(w, H, bits, group, symmetric=symmetric, float_zero_points=fzp,
                                         act_order=act_order)
    qw = pack(codes, scale, zp, bits, group, K, symmetric=symmetric, float_zero_points=fzp)
    assert (qw.N, qw.K, qw.bits, qw.block_size, qw.float_zero_points) == (24, K, bits, group, fzp)
    assert (qw.zero_points is None) == symmetric
    assert np.array_equal(dequantize(qw), wq.numpy())   # numpy's MatMulNBits decode == GPTQ's own W'
    q = unpack_codes(qw)
    assert q.max() <= (1 << bits) - 1
    # scales are fp16 values (the runtime's fast path), as the round-to-nearest packer makes them
    assert np.array_equal(qw.scales, qw.scales.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("bits, symmetric", [(4, False), (4, True), (8, False), (8, True)])
@pytest.mark.parametrize("group", [32, 64])
def test_uncorrelated_inputs_give_round_to_nearest(bits, symmetric, group):
    """With a diagonal H no error can be moved to another column: GPTQ is then the round-to-nearest
    packer, code for code."""
    _, w, _ = _layer(K=192)
    H = torch.diag(torch.rand(192, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5)
    codes, scale, zp, _ = gptq_quantize(w, H, bits, group, symmetric=symmetric)
    got = pack(codes, scale, zp, bits, group, 192, symmetric=symmetric, float_zero_points=False)
    ref = quantize_blockwise(w.numpy(), bits, group, symmetric)
    assert np.array_equal(got.B, ref.B) and np.array_equal(got.scales, ref.scales)
    assert (got.zero_points is None and ref.zero_points is None) or np.array_equal(got.zero_points, ref.zero_points)


def _reference_gptq(w, H, bits, group, damp=DAMP):
    """The algorithm as the paper states it: one column at a time, no lazy batches, float64; asymmetric
    integer zero points fixed from the error-updated columns when a group begins."""
    W = w.double().clone()
    N, K = W.shape
    H = H.clone()
    H += damp * float(torch.diagonal(H).mean()) * torch.eye(K, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    qmax = (1 << bits) - 1
    out = torch.zeros_like(W)
    for j in range(K):
        if j % group == 0:
            c = W[:, j:j + group]
            lo, hi = c.amin(1).clamp(max=0), c.amax(1).clamp(min=0)
            scale = torch.from_numpy(fp16_exact(((hi - lo) / qmax).numpy())).double()
            zp = torch.where(scale > 0, torch.round(-lo / scale.clamp(min=1e-30)).clamp(0, qmax), 0)
        q = (torch.round(W[:, j] / scale.clamp(min=1e-30)) + zp).clamp(0, qmax)
        out[:, j] = (q - zp) * scale
        e = (W[:, j] - out[:, j]) / U[j, j]
        W[:, j:] -= e[:, None] * U[j, j:][None, :]
    return out


@pytest.mark.parametrize("group", [32, 128])
def test_lazy_batches_match_the_plain_algorithm(group):
    x, w, H = _layer(K=320, N=32, seed=group)
    _, _, _, wq = gptq_quantize(w, H, 4, group)
    ref = _reference_gptq(w, H, 4, group)
    # float32 blocking vs float64 column by column: a few weights land on the neighbouring code
    # (where a value sits on a rounding boundary); the rest agree exactly
    same = torch.isclose(wq.double(), ref, rtol=0, atol=1e-6)
    assert float(same.double().mean()) > 0.98
    assert output_error(wq - w, H) == pytest.approx(output_error(ref.float() - w, H), rel=0.05)


@pytest.mark.parametrize("fzp", [False, True])
def test_groups_side_by_side_equal_one_at_a_time(fzp):
    """A layer's groups rounded in parallel threads: each result bit for bit gptq_quantize's, in order."""
    from edgeact.converters.gptq import gptq_groups

    g = torch.Generator().manual_seed(3)
    jobs = []
    for N, K in [(40, 64), (96, 160), (24, 64)]:
        x = torch.randn(300, K, generator=g)
        jobs.append((torch.randn(N, K, generator=g), (x.T @ x).double()))
    got = gptq_groups(jobs, 4, 32, float_zero_points=fzp)
    for (w, H), res in zip(jobs, got):
        ref = gptq_quantize(w, H, 4, 32, float_zero_points=fzp)
        assert all(torch.equal(a, b) for a, b in zip(res, ref))


def test_tiny_model_cli_gptq_runs_natively_as_in_onnxruntime(tmp_path, tiny_hf_dir):
    import edgeact
    from edgeact.cli import main
    from edgeact.evaluate import compare_logits

    ids = [1, 5, 9, 33, 2, 70, 11, 4, 250, 17]
    for method in ("gptq", "awq+gptq"):
        out = tmp_path / method
        assert main(["convert", str(tiny_hf_dir), "-o", str(out), "--method", method, "--group-size", "32",
                     "--calib-tokens", "96", "--quiet"]) == 0
        meta = json.loads((out / "edgeact.json").read_text())
        assert meta["quantization"]["method"] == method and meta["calibration"]["method"] == method
        cal = meta["calibration"]
        assert cal["output_error_gptq"] < cal["output_error_rtn"]
    # (the converter already ran a token of each folder in both engines; awq+gptq's are compared below)
    o = edgeact.load(tmp_path / "gptq", engine="ort").forward(ids)
    n = edgeact.load(tmp_path / "gptq", engine="native").forward(ids)
    assert compare_logits(n, o, ids).kl < 1e-3


def test_awq_gptq_float_zero_points_fold_and_load(tmp_path):
    """awq+gptq with float zero points through the API: the returned source (folded norms, GPTQ's
    dequantized linears) is the function the folder computes, both engines agree on the folder, and
    it is nearer the fp32 model than the same linears without AWQ's folds."""
    import edgeact
    from edgeact.converters.convert import convert
    from edgeact.converters.gptq import gptq_transform
    from edgeact.converters.random_model import random_source
    from edgeact.evaluate import compare_logits

    src = random_source("tiny", seed=2)
    new, override, report = gptq_transform(src, bits=4, group_size=32, float_zero_points=True, awq=True,
                                           calib_tokens=96, progress=False)
    assert report["zero_points"] == "float" and all(qw.float_zero_points for qw in override.values())
    assert len(override) == 7 * src.config.num_layers
    ids = [1, 5, 9, 33, 2, 70, 11, 4, 250, 17]
    q = convert(new, tmp_path / "q", quant="int4", group_size=32, progress=False, linear_override=override,
                method="awq+gptq", accuracy_level=0, lm_head="fp32",
                embedding="fp32")
    lo = edgeact.load(q, engine="ort").forward(ids)
    assert compare_logits(edgeact.load(q, engine="native").forward(ids), lo, ids).kl < 1e-3
    as_fp32 = edgeact.load(convert(new, tmp_path / "n", quant="fp32", progress=False), engine="ort").forward(ids)
    assert np.abs(as_fp32 - lo).max() < 1e-3
    lr = edgeact.load(convert(src, tmp_path / "fp32", quant="fp32", progress=False), engine="ort").forward(ids)
    unfolded = convert(src, tmp_path / "b", quant="int4", group_size=32, progress=False, linear_override=override)
    lb = edgeact.load(unfolded, engine="ort").forward(ids)
    assert compare_logits(lo, lr, ids).kl < compare_logits(lb, lr, ids).kl


def test_cli_float_zero_points(tmp_path, tiny_hf_dir):
    """--float-zero-points: rtn writes each decoder linear as quantize_blockwise's float-minimum blocks of
    the source (lm_head keeps its int8 default), gptq and awq+gptq write GPTQ's float-minimum rounding;
    native runs every folder as onnxruntime does."""
    import edgeact
    from edgeact.cli import main
    from edgeact.converters.onnx_writer import stored_weights
    from edgeact.converters.quantize import quantize_blockwise
    from edgeact.converters.readers import read_source
    from edgeact.evaluate import compare_logits

    src = read_source(tiny_hf_dir)
    ids = [1, 5, 9, 33, 2, 70, 11, 4, 250, 17]
    for method in ("rtn", "gptq", "awq+gptq"):
        out = tmp_path / method
        calib = [] if method == "rtn" else ["--calib-tokens", "96"]   # rtn calibrates nothing
        assert main(["convert", str(tiny_hf_dir), "-o", str(out), "--method", method, "--float-zero-points",
                     "--quiet", *calib]) == 0
        stored = stored_weights(out)
        linears = [n for n in stored if ".layers." in n]
        assert len(linears) == 7 * src.config.num_layers
        assert all(stored[n].float_zero_points for n in linears)
        assert not stored["lm_head.weight"].float_zero_points and stored["lm_head.weight"].bits == 8
        if method == "rtn":
            for n in linears:
                ref = quantize_blockwise(src.load(n), 4, 32, float_zero_points=True)
                assert np.array_equal(dequantize(stored[n]), dequantize(ref)), n
        if method == "gptq":
            assert json.loads((out / "edgeact.json").read_text())["calibration"]["zero_points"] == "float"
        o = edgeact.load(out, engine="ort").forward(ids)
        assert compare_logits(edgeact.load(out, engine="native").forward(ids), o, ids).kl < 1e-3


@pytest.mark.parametrize("argv, fragment", [
    (["--method", "awq", "--float-zero-points"], "--float-zero-points applies to --method rtn, gptq and awq+gptq"),
    (["--quant", "int8", "--float-zero-points"], "--float-zero-points is for asymmetric int4"),
    (["--symmetric", "--float-zero-points"], "--float-zero-points is for asymmetric int4"),
    (["--float-zero-points", "--target-bpw", "4.5"], "does not combine with --target-bpw/--max-size"),
    (["--quant", "fp16", "--method", "gptq"], "--method gptq needs --quant int4 or int8"),
    (["--method", "gptq", "--no-awq-clip"], "--no-awq-clip applies to --method awq"),
    (["--method", "awq+gptq", "--max-size", "100"], "does not combine with --target-bpw/--max-size"),
])
def test_bad_options_refused_in_one_line(capsys, tmp_path, argv, fragment):
    from edgeact.cli import main

    out = tmp_path / "out"
    assert main(["convert", str(tmp_path / "x.gguf"), "-o", str(out)] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgeact: error: ") and fragment in err[0], err
    assert not out.exists()


def test_float_zero_points_are_int4_only():
    from edgeact.converters.gptq import check_options
    from edgeact.converters.model import ConversionError

    with pytest.raises(ConversionError, match="float zero points"):
        check_options(8, 32, False, True)
    with pytest.raises(ConversionError, match="float zero points"):
        check_options(4, 32, True, True)
