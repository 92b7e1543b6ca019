"""--method imatrix: per block, the importance-weighted search of scale and minimum never loses to
round-to-nearest on its weighted error (RTN's grid is one of its candidates), puts the error
where the inputs are small, and writes folders both engines run."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgeact.converters.imatrix import quantize_weighted
from edgeact.converters.quantize import dequantize, quantize_blockwise


def _weighted_block_errors(qw, w, imp, group):
    e = ((dequantize(qw) - w) ** 2 * imp).reshape(w.shape[0], -1, group)
    return e.sum(-1)


@pytest.mark.parametrize("group", [32, 128])
def test_never_worse_than_rtn_per_block(group):
    rng = np.random.default_rng(group)
    w = (rng.standard_normal((48, 256)) * 0.05).astype(np.float32)
    w[:, 3] *= 10                                            # an outlier column
    imp = (rng.random(256) ** 4 * 10).astype(np.float32)
    imp[3] = 100.0
    rtn = quantize_blockwise(w, 4, group, float_zero_points=True)
    got = quantize_weighted(w, imp, 4, group)
    e_rtn, e_got = _weighted_block_errors(rtn, w, imp, group), _weighted_block_errors(got, w, imp, group)
    assert np.all(e_got <= e_rtn * (1 + 1e-5) + 1e-12)
    assert e_got.sum() < 0.9 * e_rtn.sum()
    # the important column is reproduced better than round-to-nearest does it
    assert np.abs(dequantize(got)[:, 3] - w[:, 3]).mean() < np.abs(dequantize(rtn)[:, 3] - w[:, 3]).mean()


def test_edge_blocks_and_padding():
    w = (np.random.default_rng(1).standard_normal((8, 100)) * 0.05).astype(np.float32)
    w[0, :32] = 0.0            # an all-zero block
    w[1, :32] = 0.125          # a constant block
    got = quantize_weighted(w, np.ones(100, np.float32), 4, 32)
    assert got.K == 100 and got.float_zero_points
    d = dequantize(got)
    assert np.all(d[0, :32] == 0) and np.all(d[1, :32] == np.float32(0.125))
    step = got.scales.reshape(8, -1)
    assert np.abs(d - w).max() <= step.max()


def test_cli_method_imatrix(tmp_path, tiny_hf_dir):
    import edgeact
    from edgeact.cli import main
    from edgeact.evaluate import compare_logits

    out = tmp_path / "imx"
    assert main(["convert", str(tiny_hf_dir), "-o", str(out), "--method", "imatrix", "--calib-tokens", "64",
                 "--quiet"]) == 0
    meta = json.loads((out / "edgeact.json").read_text())
    assert meta["quantization"]["method"] == "imatrix" and meta["calibration"]["method"] == "imatrix"
    ids = [1, 5, 9, 33, 2, 70, 11, 4]
    o = edgeact.load(out, engine="ort").forward(ids)
    n = edgeact.load(out, engine="native").forward(ids)
    assert compare_logits(n, o, ids).kl < 0.01
    assert main(["convert", str(tiny_hf_dir), "-o", str(tmp_path / "x"), "--method", "imatrix", "--symmetric"]) == 2
