"""CoreInfer: the NeuronMask op against numpy, the neuron set chosen after prefill and fixed
until reset (a new prompt chooses anew), native equal to onnxruntime with the same masks
(and its row-skipping path equal to its dense path), keep-all equal to the dense model,
and clear errors for bad settings."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgeact.converters.convert import convert
from edgeact.converters.coreinfer import neuron_mask_function
from edgeact.converters.model import ConversionError
from edgeact.converters.random_model import random_source
from edgeact.converters.sparsity import calibrate, parse_targets
from edgeact.engines import make_engine, native_available
from edgeact.engines.base import choose_core_neurons

needs_native = pytest.mark.skipif(not native_available(), reason="native runtime not built")


def _coreinfer(src, target="0.5"):
    return calibrate(src, "coreinfer", parse_targets(target, "coreinfer"), progress=False)


def _ids(n, seed, vocab=300):
    return np.random.default_rng(seed).integers(3, vocab, size=n, dtype=np.int64)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    src = random_source("tiny", seed=3)
    root = tmp_path_factory.mktemp("coreinfer")
    return {"dense": convert(src, root / "dense", quant="int4", progress=False),
            "int4": convert(src, root / "int4", quant="int4", sparsity=_coreinfer(src), progress=False),
            # float activations: no int8 rounding, so the engines agree to float precision at every step
            "acc1": convert(src, root / "acc1", quant="int4", accuracy_level=1, sparsity=_coreinfer(src),
                            progress=False),
            "keep_all": convert(src, root / "keep_all", quant="int4", sparsity=_coreinfer(src, "0"),
                                progress=False),
            # real models write external data: the top-k must stay readable to onnxruntime's shape inference
            "external": convert(src, root / "external", quant="int4", sparsity=_coreinfer(src), external_data=True,
                                progress=False)}


def test_neuron_mask_function_matches_numpy():
    import onnxruntime as ort

    I, k = 37, 9
    node = helper.make_node("NeuronMask", ["h", "mask", "k"], ["y", "score"], domain="ai.edgeact")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, "S", I]),
                                        helper.make_tensor_value_info("mask", TensorProto.FLOAT, [I])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "S", I]),
                           helper.make_tensor_value_info("score", TensorProto.FLOAT, [I])],
                          [onnx.numpy_helper.from_array(np.array([k], np.int64), "k")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("ai.edgeact", 1)],
                          functions=[neuron_mask_function()], ir_version=10)
    onnx.checker.check_model(m, full_check=True)
    rng = np.random.default_rng(0)
    h = rng.standard_normal((1, 6, I)).astype(np.float32)
    mask = (rng.random(I) < 0.5).astype(np.float32)
    y, score = ort.InferenceSession(m.SerializeToString()).run(None, {"h": h, "mask": mask})
    assert np.array_equal(y, h * mask)
    kth = -np.sort(-np.abs(h[0]), axis=-1)[:, k - 1:k]
    assert np.array_equal(score, (np.abs(h[0]) >= kth).sum(0).astype(np.float32))
    assert score.sum() == 6 * k


def test_choose_core_neurons_keeps_the_most_used_ties_to_lower_index():
    scores = np.array([[3, 1, 3, 0, 2], [0, 0, 0, 0, 0]], np.float32)
    assert choose_core_neurons(scores, 2).tolist() == [[1, 0, 1, 0, 0], [1, 1, 0, 0, 0]]


@pytest.mark.parametrize("engine", ["ort", pytest.param("native", marks=needs_native)])
@pytest.mark.parametrize("folder", ["int4", "external"])
def test_set_is_chosen_after_prefill_fixed_during_decode_and_new_per_prompt(folders, engine, folder):
    eng = make_engine(folders[folder], engine)
    keep, width = eng.core_keep, eng.meta["config"]["intermediate_size"]
    assert keep == width // 2 and eng.core_masks is None
    eng.forward(_ids(24, 1))
    first = eng.core_masks.copy()
    assert first.shape == (eng.num_layers, width) and (first.sum(1) == keep).all()
    assert np.array_equal(first, choose_core_neurons(eng.neuron_scores(), keep))
    for t in _ids(12, 2):
        eng.forward([t])
        assert np.array_equal(eng.core_masks, first)
    eng.reset()
    assert eng.core_masks is None
    eng.forward(_ids(24, 3))   # another prompt
    assert not np.array_equal(eng.core_masks, first) and (eng.core_masks.sum(1) == keep).all()


@needs_native
def test_native_decode_computes_only_the_kept_neurons(folders):
    eng = make_engine(folders["int4"], "native")
    eng.forward(_ids(24, 1))
    eng.profile(True)
    eng.profile_reset()
    for t in _ids(8, 2):
        eng.forward([t])
    recs = [r for r in eng.profile_records() if r["op_type"] == "NeuronMask"]
    assert len(recs) == eng.num_layers
    assert all(r["active"] == 8 * eng.core_keep and r["total"] == 8 * 100 for r in recs)


@needs_native
def test_native_equals_onnxruntime_with_the_same_masks(folders):
    from edgeact.evaluate import compare_logits

    prompt, cont = _ids(24, 1), _ids(40, 4)
    # float activations: scores, masks and every step agree to float precision
    o, n = make_engine(folders["acc1"], "ort"), make_engine(folders["acc1"], "native")
    assert np.abs(o.forward(prompt) - n.forward(prompt)).max() <= 1e-4
    assert np.array_equal(o.neuron_scores(), n.neuron_scores())
    assert np.array_equal(o.core_masks, n.core_masks)
    for t in cont[:16]:
        assert np.abs(o.forward([t]) - n.forward([t])).max() <= 1e-4
    # int8 activations: measured KL 2.7e-14 (summation order), top-1 1.0; bound 1e-10, as in
    # tests/test_sparsity.py: 1000x below the cost of one flipped int8 code (~1e-7)
    o, n = make_engine(folders["int4"], "ort"), make_engine(folders["int4"], "native")
    o.forward(prompt), n.forward(prompt)
    assert np.array_equal(o.core_masks, n.core_masks)
    lo = np.concatenate([o.forward([t]) for t in cont])
    ln = np.concatenate([n.forward([t]) for t in cont])
    q = compare_logits(ln, lo, np.append(cont, 0))
    assert q.kl <= 1e-10 and q.top1 >= 0.97, (q.kl, q.top1)


@needs_native
def test_native_row_skipping_equals_its_dense_path(folders):
    """Masks of 0 skip gate/up rows and down columns; masks of 1e-30 in their place keep every
    neuron on the dense kernels and give the same numbers (h·1e-30 is 0 after down_proj's int8 codes)."""
    base = make_engine(folders["int4"], "ort")
    base.forward(_ids(24, 1))
    masks = base.core_masks
    out = []
    for off in (0.0, 1e-30):
        n = make_engine(folders["int4"], "native")
        n.core_keep = None   # drive the masks by hand
        n.forward(_ids(24, 1))
        for i in range(n.num_layers):
            n.session.set_neuron_mask(i, np.where(masks[i] > 0, 1.0, off))
        out.append(np.concatenate([n.forward([t]) for t in _ids(12, 2)]))
    assert np.array_equal(out[0], out[1])


@pytest.mark.parametrize("engine", ["ort", pytest.param("native", marks=needs_native)])
def test_keeping_every_neuron_is_the_dense_model(folders, engine):
    ids = _ids(30, 5)
    dense, full = make_engine(folders["dense"], engine), make_engine(folders["keep_all"], engine)
    assert full.core_keep == 100
    a = np.concatenate([dense.forward(ids[:20])] + [dense.forward(ids[i:i + 1]) for i in range(20, 30)])
    b = np.concatenate([full.forward(ids[:20])] + [full.forward(ids[i:i + 1]) for i in range(20, 30)])
    assert np.array_equal(a, b)


def test_bad_settings(folders, tmp_path):
    with pytest.raises(ConversionError, match="outside"):
        parse_targets("1.0", "coreinfer")
    assert parse_targets("attn=0.3,ffn=0.6", "coreinfer") == {"ffn": 0.6}   # FFN only
    src = random_source("tiny", seed=2)
    del src.tensors["model.layers.0.mlp.gate_proj.weight"]
    with pytest.raises(ConversionError, match="gated FFN"):
        _coreinfer(src)
    eng = make_engine(folders["int4"], "ort")
    with pytest.raises(ValueError, match="shape"):
        eng.set_neuron_masks(np.ones((eng.num_layers, 7)))
    with pytest.raises(ValueError, match="NaN"):
        eng.set_neuron_masks(np.full((eng.num_layers, 100), np.nan))
    with pytest.raises(ValueError, match="no CoreInfer"):
        make_engine(folders["dense"], "ort").set_neuron_masks(None)
    if native_available():
        s = make_engine(folders["int4"], "native").session
        for bad, match in (((0, np.ones(7)), "100 neurons"), ((5, np.ones(100)), "out of range"),
                           ((0, np.full(100, np.inf)), "non-finite")):
            with pytest.raises(ValueError, match=match):
                s.set_neuron_mask(*bad)
        with pytest.raises(ValueError, match="no NeuronMask"):
            make_engine(folders["dense"], "native").session.set_neuron_mask(0, np.ones(100))


def test_cli_convert_records_coreinfer(tmp_path, tiny_hf_dir):
    from edgeact.cli import main

    hf = tiny_hf_dir
    out = tmp_path / "core"
    assert main(["convert", str(hf), "-o", str(out), "--sparsity", "0.6", "--sparsity-method", "coreinfer",
                 "--quiet"]) == 0
    meta = json.loads((out / "edgeact.json").read_text())["sparsity"]
    assert meta["method"] == "coreinfer" and meta["keep"] == 40 and meta["targets"] == {"ffn": 0.6}


@needs_native
def test_low_memory_load_runs_the_same_model(folders, monkeypatch):
    # down_proj reads the NeuronMask output: low memory frees its dense repack; the prompt's rows run
    # the input-sparse GEMV over their nonzero channels, decode over the kept neurons. The reference
    # takes the fixed rule: the dense GEMM's prefill.
    prompt, cont = _ids(24, 1), _ids(12, 2)
    monkeypatch.setenv("EDGEACT_SPARSE_STATIC", "1")
    d = make_engine(folders["int4"], "native")
    monkeypatch.delenv("EDGEACT_SPARSE_STATIC")
    lo = make_engine(folders["int4"], "native", low_memory=True)
    assert lo.repacked_bytes < d.repacked_bytes
    assert np.array_equal(d.forward(prompt), lo.forward(prompt))
    assert np.array_equal(d.core_masks, lo.core_masks)
    a = np.concatenate([d.forward([t]) for t in cont])
    b = np.concatenate([lo.forward([t]) for t in cont])
    assert np.array_equal(a, b)
