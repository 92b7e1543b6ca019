"""A conversion never leaves a folder its engines cannot load, and the convert/eval/sweep/info
commands fail clearly: every sparsity method on every bundled model shape (including heads the
writer pads) loads and runs in both engines; a folder an engine refuses is not written; settings
that would be ignored are one-line errors; warnings are one plain line; calibration text is
sampled once per conversion and long steps show progress; `info` summarizes calibration and
fails (exit 2, one line) on a broken folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

import edgeact
from edgeact.cli import main
from edgeact.converters.convert import convert
from edgeact.converters.model import ConversionError
from edgeact.converters.random_model import SHAPES, random_source
from edgeact.converters.sparsity import METHODS, calibrate, parse_targets
from edgeact.engines import native_available
from edgeact.evaluate import compare_logits
from edgeact.verify import verify_folder

ENGINES = ["ort"] + (["native"] if native_available() else [])


def _shape(name, stories260k=None):
    if name == "stories260K":   # head_dim 8: the graph pads every head to 16
        from edgeact.converters.readers import read_source

        with pytest.warns(UserWarning, match="tokenizer"):
            return read_source(stories260k)
    if name == "padded-24":     # head_dim 24 → 32, MHA
        return random_source(replace(SHAPES["tiny"], num_heads=2, num_kv_heads=2, head_dim=24), seed=3)
    if name == "smollm2-135m":  # the real dims (GQA 9:3, head 64), two layers and a small vocabulary
        return random_source("smollm2-135m", seed=1, num_layers=2, vocab_size=512, max_position_embeddings=256)
    return random_source(name, seed=2)


SHAPE_NAMES = ("stories260K", "tiny", "smollm2-135m", "padded-24")


_SOURCES: dict = {}


@pytest.fixture
def source(request, shape):
    """The shape's SourceModel, its fp32 transformers model and a few calibration/test ids (built once)."""
    from edgeact.converters.torch_ref import build_torch_model

    if shape not in _SOURCES:
        stories = request.getfixturevalue("stories260k") if shape == "stories260K" else None
        src = _shape(shape, stories)
        ids = np.random.default_rng(0).integers(3, src.config.vocab_size, size=(2, 48))
        _SOURCES[shape] = (src, build_torch_model(src), ids)
    return _SOURCES[shape]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPE_NAMES)
def test_every_method_on_every_shape_loads_in_both_engines(source, shape, method, tmp_path):
    src, model, ids = source
    sp = calibrate(src, method, parse_targets("0.5", method), calib_ids=ids, model=model, progress=False)
    folder = convert(src, tmp_path / "m", quant="int4", progress=False, sparsity=sp, verify=verify_folder)
    assert sorted(verify_folder(folder)) == sorted(ENGINES)
    if src.config.head_dim % 16 and method not in ("cats", "coreinfer"):
        # the padded slots of the attention output are always zero: they must stay inactive
        m = onnx.load(str(folder / "model.onnx"))
        thr = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}["layers.0.attn_out.threshold"]
        assert thr.shape == (src.config.num_heads * 16 * -(-src.config.head_dim // 16),)
    test_ids = ids[1, :16]
    logits = {e: edgeact.load(folder, engine=e).forward(test_ids) for e in ENGINES}
    assert all(np.isfinite(v).all() and v.shape == (16, src.config.vocab_size) for v in logits.values())
    if "native" in logits:
        # a channel whose score sits at its threshold may flip between engines (int8 activation rounding)
        q = compare_logits(logits["native"], logits["ort"], test_ids)
        if q.kl > 5e-3 and (shape, method) == ("stories260K", "cats"):
            # int4 with int8 activations (accuracy_level 4) only: fp32, int8 and accuracy_level 1 agree exactly
            pytest.xfail(f"native and onnxruntime differ on int4 CATS for stories260K (KL {q.kl:.3g})")
        assert q.kl <= 5e-3, q.kl


def test_writer_rejects_thresholds_of_the_wrong_width(tmp_path):
    src = random_source("tiny", seed=2)
    sites = {"layers.0.attn_out": (np.zeros(47, np.float32), np.ones(47, np.float32))}
    with pytest.raises(ConversionError, match="layers.0.attn_out.*input width 48"):
        convert(src, tmp_path / "m", progress=False, sparsity={"sites": sites, "meta": {}})
    assert not list(tmp_path.iterdir())


def test_a_folder_an_engine_refuses_is_not_written(tmp_path):
    src = random_source("tiny", seed=2)

    def refuse(folder):
        assert (Path(folder) / "model.onnx").is_file() and (Path(folder) / "edgeact.json").is_file()
        raise ValueError("native runtime: node 'x' (Sparsify): threshold must have 48 elements\nmore")

    with pytest.raises(ConversionError, match=r"does not load, so no folder was written: native runtime: node 'x'"):
        convert(src, tmp_path / "m", progress=False, verify=refuse)
    assert not list(tmp_path.iterdir())   # neither OUT nor OUT.tmp-<pid>


def test_verify_folder_names_the_engine_that_refuses(tmp_path):
    src = random_source("tiny", seed=2)
    folder = convert(src, tmp_path / "m", progress=False, sparsity={
        "sites": {"layers.0.attn_out": (np.zeros(48, np.float32), np.ones(48, np.float32))}, "meta": {}})
    m = onnx.load(str(folder / "model.onnx"))
    for t in m.graph.initializer:   # the defect of a padded-head folder: a threshold narrower than its input
        if t.name == "layers.0.attn_out.threshold":
            t.CopyFrom(onnx.numpy_helper.from_array(np.zeros(32, np.float32), t.name))
    onnx.save(m, str(folder / "model.onnx"))
    with pytest.raises(ValueError, match="^native runtime: .*48 elements" if native_available() else "^onnxruntime"):
        verify_folder(folder)
    with pytest.raises(ValueError, match="^onnxruntime: .*(Incompatible|ShapeInference)"):
        verify_folder(folder, engines=["ort"])


# --- the command line ----------------------------------------------------------------------------

def _one_line_error(capsys, argv, *fragments):
    try:
        rc = main(argv)
    except SystemExit as e:   # argparse's own errors exit from inside parse_args
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgeact: error: "), err
    for f in fragments:
        assert f in err[0], (f, err[0])
    return err[0]


@pytest.mark.parametrize("extra, fragment", [
    (["--sparsity-method", "wina"], "--sparsity-method wina needs --sparsity"),
    (["--calib-tokens", "64"], "--calib-tokens applies to --method awq"),
    (["--calib", "x.txt"], "--calib applies to"),
    (["--sparsity", "0.5", "--sparsity-method", "coreinfer", "--calib-tokens", "64"], "nothing here is calibrated"),
    (["--no-awq-clip"], "--no-awq-clip applies to --method awq"),
    (["--quant", "fp16", "--group-size", "64"], "--group-size applies to int4/int8 weights"),
    (["--quant", "fp32", "--symmetric"], "--symmetric applies to int4/int8"),
    (["--quant", "fp16", "--method", "awq"], "--method awq needs --quant int4 or int8"),
    (["--max-context", "0"], "--max-context must be a positive"),
    (["--method", "awq", "--calib-tokens", "1"], "--calib-tokens must be at least 2"),
    (["--sparsity", "1.2"], "outside [0, 1)"),
    (["--sparsity", "attn=0.5", "--sparsity-method", "cats"], "cats sparsifies the FFN only"),
    (["--sparsity", "0.5", "--sparsity-method", "foo"], "invalid choice: 'foo'"),
])
def test_convert_settings_that_would_be_ignored_are_errors(capsys, tmp_path, extra, fragment):
    out = tmp_path / "out"
    _one_line_error(capsys, ["convert", str(tmp_path / "nowhere.gguf"), "-o", str(out)] + extra, fragment)
    assert not out.exists()


def test_convert_refuses_an_existing_output_in_cli_words(capsys, tmp_path):
    (tmp_path / "out").mkdir()
    msg = _one_line_error(capsys, ["convert", str(tmp_path / "x.gguf"), "-o", str(tmp_path / "out")], "--overwrite")
    assert "overwrite=True" not in msg


def test_missing_tokenizer_warning_is_one_plain_line(stories260k, tmp_path):
    r = subprocess.run([sys.executable, "-m", "edgeact.cli", "convert", str(stories260k), "-o", str(tmp_path / "s"),
                        "--quant", "fp32", "--quiet"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONWARNINGS": "default"})
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines == [f"edgeact: warning: no tokenizer.bin beside {stories260k} (pass --tokenizer); "
                     "the converted model will run on token ids only"], lines


@pytest.fixture(scope="module")
def awq_sparse(tiny_hf_dir, tmp_path_factory):
    """One CLI conversion with AWQ and TEAL (calibration sampled once), its stderr, and the
    number of times calibration text was sampled."""
    import edgeact.converters.calibration as calibration

    calls = []
    real = calibration.sample_batch

    def counting(*a, **kw):
        calls.append(kw.get("seeds"))
        return real(*a, **kw)

    out = tmp_path_factory.mktemp("awq") / "awq-teal"
    mp = pytest.MonkeyPatch()
    mp.setattr(calibration, "sample_batch", counting)
    import contextlib
    import io

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            rc = main(["convert", str(tiny_hf_dir), "-o", str(out), "--method", "awq", "--sparsity", "0.4",
                       "--calib-tokens", "96"])
    finally:
        mp.undo()
    assert rc == 0, err.getvalue()
    return out, err.getvalue(), calls


def test_awq_and_sparsity_share_one_calibration_sample(awq_sparse):
    out, _, calls = awq_sparse
    assert len(calls) == 1
    meta = json.loads((out / "edgeact.json").read_text())
    assert meta["calibration"]["calibration"]["tokens"] == meta["sparsity"]["calibration"]["tokens"] == 96
    assert sorted(verify_folder(out)) == sorted(ENGINES)


def test_long_convert_steps_show_progress(awq_sparse):
    _, err, _ = awq_sparse
    for step in ("loading the fp32 reference", "sampling calibration text", "AWQ", "calibrating teal", "writing"):
        assert step in err, step
    assert "96/96" in err or "95/95" in err   # the sampling bar counts tokens


def test_info_summarizes_awq_calibration(awq_sparse, capsys):
    out, _, _ = awq_sparse
    assert main(["info", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    cal = next(l for l in lines if l.strip().startswith("calibration"))
    spars = next(l for l in lines if l.strip().startswith("sparsity"))
    assert "AWQ on 96 tokens (sampled from the fp32 model), clipping on" in cal
    assert "scale exponent α median" in cal and "round-to-nearest" in cal
    assert "{" not in cal and "{" not in spars
    assert "teal: target attn 0.4, ffn 0.4" in spars
    for line in (cal, spars):   # no float noise such as 0.35000000000000003
        assert not any(len(tok.split(".")[-1]) > 6 for tok in line.replace(",", " ").split() if tok[:1].isdigit())


def test_info_on_broken_folders_is_one_line_and_exit_2(awq_sparse, capsys, tmp_path):
    good, _, _ = awq_sparse
    cases = {}
    for name in ("no-onnx", "bad-json", "no-config", "list-json"):
        d = tmp_path / name
        d.mkdir()
        (d / "model.onnx").write_bytes((good / "model.onnx").read_bytes())
        (d / "edgeact.json").write_text((good / "edgeact.json").read_text())
        cases[name] = d
    (cases["no-onnx"] / "model.onnx").unlink()
    (cases["bad-json"] / "edgeact.json").write_text("{not json")
    meta = json.loads((good / "edgeact.json").read_text())
    del meta["config"]["hidden_size"]
    (cases["no-config"] / "edgeact.json").write_text(json.dumps(meta))
    (cases["list-json"] / "edgeact.json").write_text("[1, 2]")
    expect = {"no-onnx": "has no model.onnx", "bad-json": "not valid JSON", "no-config": "config lacks hidden_size",
              "list-json": "not an edgeact model description"}
    for name, d in cases.items():
        _one_line_error(capsys, ["info", str(d)], expect[name])
    _one_line_error(capsys, ["info", str(tmp_path / "absent")], "not found")


@pytest.mark.skipif(not native_available(), reason="native runtime not built")
def test_info_fails_when_the_native_runtime_refuses_the_graph(awq_sparse, capsys, tmp_path):
    good, _, _ = awq_sparse
    d = tmp_path / "bad-graph"
    d.mkdir()
    (d / "edgeact.json").write_text((good / "edgeact.json").read_text())
    m = onnx.load(str(good / "model.onnx"))
    for t in m.graph.initializer:
        if t.name == "layers.0.attn_in.threshold":
            t.CopyFrom(onnx.numpy_helper.from_array(np.zeros(5, np.float32), t.name))
    onnx.save(m, str(d / "model.onnx"))
    assert main(["info", str(d)]) == 2
    cap = capsys.readouterr()
    assert "architecture" in cap.out   # what could be read is still described
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and "the native runtime cannot load" in err[0] and "layers.0.attn_in" in err[0], err


@pytest.mark.parametrize("extra, fragment", [
    (["--tokens", "1"], "--tokens must be at least 2"),
    (["--seed", "-1"], "--seed must be a non-negative"),
    (["--text", "missing.txt"], "evaluation text missing.txt not found"),
])
def test_eval_bad_settings_are_one_line(capsys, awq_sparse, extra, fragment, monkeypatch, tmp_path):
    out, _, _ = awq_sparse
    monkeypatch.chdir(tmp_path)
    _one_line_error(capsys, ["eval", str(out), "--ref", "nowhere.gguf"] + extra, fragment)


def test_eval_checks_the_folders_before_building_the_reference(capsys, tmp_path):
    _one_line_error(capsys, ["eval", str(tmp_path / "absent"), "--ref", str(tmp_path / "nowhere.gguf")],
                    "model folder not found")


def test_eval_non_utf8_text_names_the_byte(capsys, awq_sparse, tmp_path, tiny_hf_dir):
    out, _, _ = awq_sparse
    bad = tmp_path / "t.txt"
    bad.write_bytes(b"caf\xe9 au lait")
    _one_line_error(capsys, ["eval", str(out), "--ref", str(tiny_hf_dir), "--text", str(bad)], "byte 0xe9 at offset 3")


def test_eval_shows_progress(awq_sparse, tiny_hf_dir, capsys):
    out, _, _ = awq_sparse
    assert main(["eval", str(out), "--ref", str(tiny_hf_dir), "--tokens", "24"]) == 0
    cap = capsys.readouterr()
    for step in ("loading the fp32 reference", "sampling evaluation text", "reference logits (25 tokens)",
                 "evaluating"):
        assert step in cap.err, step
    assert "KL nats/tok" in cap.out


@pytest.mark.parametrize("extra, fragment", [
    (["--no-quality", "--no-speed"], "leaves nothing to measure"),
    (["--sparsities", "0.5,1.5"], "1.5 is outside [0, 1)"),
    (["--sparsities", "0.5,x"], "--sparsities takes comma-separated numbers"),
    (["--methods", "teal,foo"], "unknown sparsity method 'foo'"),
    (["--methods", ","], "--methods names no method"),
    (["--no-quality", "--png", "p.png"], "--png plots quality"),
    (["--tokens", "0"], "--tokens must be at least 2"),
    (["--group-size", "48"], "group size 48 is not supported"),
])
def test_sweep_bad_settings_are_one_line(capsys, tmp_path, extra, fragment):
    _one_line_error(capsys, ["sweep", "random:tiny", "-o", str(tmp_path / "sw")] + extra, fragment)
    assert not (tmp_path / "sw").exists()


def test_sparsity_methods_listed_once_for_the_cli():
    from edgeact.commands.convert import SPARSITY_METHODS

    assert SPARSITY_METHODS == METHODS


def test_steer_compute_shows_progress(tiny_hf_dir, capsys):
    from edgeact.steering import compute_vectors

    rng = np.random.default_rng(0)
    pos = [list(rng.integers(3, 300, 6)) for _ in range(3)]
    neg = [list(rng.integers(3, 300, 6)) for _ in range(3)]
    vecs = compute_vectors(str(tiny_hf_dir), pos, neg, progress=True)
    assert sorted(vecs) == [0, 1]
    err = capsys.readouterr().err
    assert "loading the fp32 reference" in err and "hidden states of the prompts" in err and "6/6" in err
    compute_vectors(str(tiny_hf_dir), pos, neg, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("method", ["cats", "coreinfer"])
def test_ffn_only_methods_refuse_an_attention_target(method):
    with pytest.raises(ConversionError, match=f"{method} sparsifies the FFN only"):
        parse_targets("attn=0.5", method)
    assert parse_targets("attn=0.3,ffn=0.5", method) == {"ffn": 0.5}


def test_max_context_zero_is_an_error_not_the_default(tmp_path):
    with pytest.raises(ConversionError, match="max_context must be positive"):
        convert(random_source("tiny", seed=2), tmp_path / "m", progress=False, max_context=0)
    assert not (tmp_path / "m").exists()


def test_eval_threads_must_be_positive(capsys, tmp_path):
    _one_line_error(capsys, ["eval", str(tmp_path), "--ref", "x.gguf", "--threads", "-3"],
                    "--threads: must be a positive number of threads, not -3")
