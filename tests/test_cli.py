"""The `edgeact` command end to end on a tiny Hugging Face folder, and its errors:
one line on stderr, exit code 2, no half-written output."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edgeact.cli import main


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    import torch
    import transformers

    from edgeact.converters.random_model import SHAPES
    from edgeact.converters.torch_ref import hf_config

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_config(SHAPES["tiny"]))
    out = tmp_path_factory.mktemp("cli") / "tiny-hf"
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-out") / "tiny-int4"
    assert main(["convert", str(hf_dir), "-o", str(out), "--quant", "int4", "--group-size", "32", "--quiet"]) == 0
    return out


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "edgeact.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_convert_writes_folder(converted):
    meta = json.loads((converted / "edgeact.json").read_text())
    assert meta["quantization"]["weights"] == "int4" and meta["quantization"]["group_size"] == 32
    assert (converted / "model.onnx").exists()


def test_run_on_token_ids(converted, capsys):
    assert main(["run", str(converted), "-p", "1,5,7", "-n", "6", "--engine", "ort"]) == 0
    ids = [int(t) for t in capsys.readouterr().out.split()]
    assert len(ids) == 6 and all(0 <= i < 300 for i in ids)
    import edgeact

    # the CLI's default repetition penalty is 1.1 (small greedy models loop without one); 1 turns it off
    model = edgeact.load(converted, engine="ort")
    assert ids == model.generate([1, 5, 7], max_new_tokens=6, repetition_penalty=1.1).ids
    assert main(["run", str(converted), "-p", "1,5,7", "-n", "6", "--engine", "ort", "--repetition-penalty", "1"]) == 0
    assert [int(t) for t in capsys.readouterr().out.split()] == model.generate([1, 5, 7], max_new_tokens=6).ids


def test_info(converted, capsys):
    assert main(["info", str(converted)]) == 0
    out = capsys.readouterr().out
    assert "int4 blockwise g32" in out and "2 layers" in out and "model.onnx" in out
    assert main(["info", str(converted), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["hidden_size"] == 48


def test_eval_json_self_is_exact(hf_dir, tmp_path, capsys):
    out = tmp_path / "fp32"
    assert main(["convert", str(hf_dir), "-o", str(out), "--quant", "fp32", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--ref", str(hf_dir), "--tokens", "48", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)["results"][0]
    assert r["kl"] < 1e-6 and r["top1"] == 1.0 and abs(r["ppl_ratio"] - 1) < 1e-4


@pytest.mark.parametrize("args, message", [
    (["convert", "/nonexistent/model.gguf", "-o", "{tmp}/o"], "does not exist"),
    (["run", "{tmp}/missing", "-p", "hi"], "not found"),
    (["run", "{converted}", "-p", "1,2,99999", "--engine", "ort"], "out of range"),
    (["run", "{converted}", "-p", "hello there", "--engine", "ort"], "no tokenizer"),
    (["info", "{hf}"], "convert it first"),
    (["bench", "--kernels", "1,x,3"], "M,K,N"),
])
def test_errors_are_one_line(args, message, tmp_path, converted, hf_dir):
    args = [a.format(tmp=tmp_path, converted=converted, hf=hf_dir) for a in args]
    proc = run_cli(*args)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgeact: error:") and message in err[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_option_value_exits_2(hf_dir, tmp_path):
    proc = run_cli("convert", hf_dir, "-o", tmp_path / "o", "--quant", "int3")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_failed_convert_leaves_no_folder(tmp_path):
    bad = tmp_path / "broken.bin"
    bad.write_bytes(np.array([64, 172, 5, 8, 4, 512, 512], dtype=np.int32).tobytes() + b"\0" * 1000)
    proc = run_cli("convert", bad, "-o", tmp_path / "out")
    assert proc.returncode == 2 and "truncated" in proc.stderr
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())


def test_help_on_every_command():
    for cmd in ("convert", "run", "eval", "info", "bench", "steer"):
        proc = run_cli(cmd, "--help")
        assert proc.returncode == 0 and "usage: edgeact " + cmd in proc.stdout


def test_run_low_memory(hf_dir, tmp_path, capsys):
    from edgeact.engines import native_available

    if not native_available():
        pytest.skip("native runtime not built")
    out = tmp_path / "teal"
    assert main(["convert", str(hf_dir), "-o", str(out), "--quant", "int4", "--sparsity", "0.5",
                 "--sparsity-method", "teal", "--calib-tokens", "64", "--quiet"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["run", str(out), "-p", "1,5,7", "-n", "6", "--low-memory"]) == 0
    ids = [int(t) for t in capsys.readouterr().out.split()]
    import edgeact

    model = edgeact.load(out, engine="native", low_memory=True)
    assert ids == model.generate([1, 5, 7], max_new_tokens=6, repetition_penalty=1.1).ids
    res = run_cli("run", out, "-p", "1,5,7", "-n", "2", "--engine", "ort", "--low-memory")
    assert res.returncode == 2 and "native engine" in res.stderr and not res.stdout
