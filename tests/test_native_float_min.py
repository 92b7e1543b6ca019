"""Float block minimums (MatMulNBits float zero points) in a TEAL-sparse folder: the input-sparse
kernels hold integer zero points only, so the planner keeps these matmuls on the dense kernels,
whose minimums the repack carries (native/tests/test_kernels.c checks those bit for bit on every
ISA). The folder loads, decodes the prefill's rows, and stays near onnxruntime."""
import json

import numpy as np
import pytest

from edgeact.engines import native_available

pytestmark = pytest.mark.skipif(not native_available(), reason="native runtime not built")


def test_teal_folder_with_float_minimums(tmp_path, tiny_hf_dir, monkeypatch):
    import edgeact
    from edgeact.cli import main
    from edgeact.evaluate import compare_logits

    out = tmp_path / "imx-teal"
    assert main(["convert", str(tiny_hf_dir), "-o", str(out), "--method", "imatrix", "--sparsity", "0.5",
                 "--calib-tokens", "64", "--quiet"]) == 0
    meta = json.loads((out / "edgeact.json").read_text())
    assert meta["quantization"]["method"] == "imatrix" and meta["sparsity"]["method"] == "teal"
    ids = [1, 5, 9, 33, 2, 70, 11, 4, 19, 23, 8, 3]
    monkeypatch.setenv("EDGEACT_SPARSE_ALWAYS", "1")   # every matmul that can go sparse does
    eng = edgeact.load(out, engine="native").engine
    full = eng.forward(ids)
    eng.reset()
    eng.forward(ids[:6])
    eng.session.profile(True)
    dec = np.concatenate([eng.forward(ids[i:i + 1]) for i in range(6, len(ids))])
    recs = [r for r in eng.session.profile_records() if r["op_type"] == "MatMulNBits"]
    assert recs and all(r["sparse_calls"] == 0 for r in recs), recs
    assert np.abs(dec - full[6:]).max() <= 1e-4
    ort = edgeact.load(out, engine="ort").forward(ids)
    assert compare_logits(full, ort, ids).kl < 0.01
