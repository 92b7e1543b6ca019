"""The layers the design promises: converters never import the SDK or the runtime, the runtime
never imports converters or the SDK, the folder contract imports none of them; and the
contract (version, block sizes per engine, op names) is what the engines really do."""
import ast
import re
from pathlib import Path

import numpy as np
import pytest

from edgeact import contract
from edgeact.engines import native_available

REPO = Path(__file__).resolve().parent.parent
# source folder -> installed package (pyproject.toml's package-dir)
PACKAGES = {"sdk": "edgeact", "converters": "edgeact.converters", "runtime": "edgeact.runtime",
            "contract": "edgeact.contract"}
NEVER = {"converters": {"sdk", "runtime"}, "runtime": {"converters", "sdk"},
         "contract": {"converters", "runtime", "sdk"}}


def layer_of(module: str) -> str | None:
    """The source folder an absolute module name lives in (None: not edgeact)."""
    if module != "edgeact" and not module.startswith("edgeact."):
        return None
    for folder in ("converters", "runtime", "contract"):
        if module == PACKAGES[folder] or module.startswith(PACKAGES[folder] + "."):
            return folder
    return "sdk"   # edgeact itself (sdk/__init__.py) and every other edgeact.* module


def imports_of(path: Path, package: str):
    """(line, absolute module) for every import in the file, relative ones resolved against `package`;
    `from X import y` yields X and X.y (y may be a submodule), and importlib.import_module("...") counts."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module
            if node.module:   # `from .. import x` names x only (a submodule or one of the package's names)
                yield node.lineno, mod
            for a in node.names:
                yield node.lineno, f"{mod}.{a.name}"
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in ("import_module", "__import__"):
                yield node.lineno, node.args[0].value


def package_of(path: Path, root: Path = REPO) -> str:
    rel = path.relative_to(root)
    folder = rel.parts[0]
    return ".".join(PACKAGES[folder].split(".") + list(rel.parts[1:-1]))   # the package holding the file


def broken_nevers(root: Path = REPO):
    out = []
    for folder, banned in NEVER.items():
        for path in sorted((root / folder).rglob("*.py")):
            for line, mod in imports_of(path, package_of(path, root)):
                layer = layer_of(mod)
                if layer in banned:
                    out.append(f"{path.relative_to(root)}:{line} imports {mod} ({folder} -> {layer})")
    return out


def test_no_layer_imports_what_it_must_never_import():
    assert broken_nevers() == []


@pytest.mark.parametrize("folder, source, banned", [
    ("converters", "from .. import __version__\n", "converters -> sdk"),
    ("converters", "from edgeact.engines.ort_engine import OrtEngine\n", "converters -> sdk"),
    ("converters", "def f():\n    from ..runtime import NativeModel\n", "converters -> runtime"),
    ("converters", "import edgeact.runtime\n", "converters -> runtime"),
    ("runtime", "from ..converters.model import ModelConfig\n", "runtime -> converters"),
    ("runtime", "import importlib\nimportlib.import_module('edgeact.api')\n", "runtime -> sdk"),
    ("contract", "from edgeact import load\n", "contract -> sdk"),
    ("converters", "from .. import api\n", "converters -> sdk"),
])
def test_the_check_sees_each_kind_of_import(tmp_path, folder, source, banned):
    """The checker itself: each way of writing a forbidden import is reported; allowed ones are not."""
    for f in PACKAGES:
        (tmp_path / f).mkdir()
    (tmp_path / folder / "bad.py").write_text(source)
    (tmp_path / "converters" / "ok.py").write_text("from ..contract import VERSION\nfrom .model import X\n")
    (tmp_path / "runtime" / "ok.py").write_text("from ..contract import check_meta\nimport numpy\n")
    found = broken_nevers(tmp_path)
    assert len(found) >= 1 and all(banned in f and "bad.py" in f for f in found), found


# ---- the contract against what each side does

def test_one_version_number():
    import edgeact

    assert edgeact.__version__ == contract.VERSION
    text = (REPO / "pyproject.toml").read_text()
    assert 'attr = "contract.VERSION"' in text and not re.search(r'^version\s*=\s*"', text, re.M)
    api_c = (REPO / "native" / "src" / "api.c").read_text()
    assert f'return "{contract.VERSION}";' in api_c, "native/src/api.c ea_version() differs from edgeact.contract"
    if native_available():
        from edgeact.runtime import version

        assert version() == contract.VERSION


def test_converter_stamps_the_contract(tmp_path):
    import json

    from edgeact.converters.convert import convert
    from edgeact.converters.random_model import random_source

    out = convert(random_source("tiny"), tmp_path / "m", quant="int4", progress=False)
    card = json.loads((out / contract.META_FILE).read_text())
    assert (card["format"], card["format_version"], card["converter_version"]) == \
        (contract.FORMAT, contract.FORMAT_VERSION, contract.VERSION)
    assert set(card) == set(contract.META_KEYS) and set(card["config"]) == set(contract.CONFIG_KEYS)
    contract.check_meta(card)
    import onnx

    m = onnx.load(str(out / contract.MODEL_FILE), load_external_data=False)
    assert {(n.domain, n.op_type) for n in m.graph.node} <= contract.OPS
    assert {(o.domain, o.version) for o in m.opset_import} == set(contract.OPSET.items())
    names = {i.name for i in m.graph.input} | {o.name for o in m.graph.output}
    for i in range(2):
        assert {contract.past_key(i), contract.past_value(i), contract.steer_add(i), contract.steer_ablate(i)} <= names
    assert {contract.INPUT_IDS, contract.SEQLENS_K, contract.TOTAL_SEQUENCE_LENGTH, contract.LOGITS} <= names


@pytest.mark.parametrize("group", sorted({16, 24, 32, 48, 64, 128, 256}))
def test_converter_writes_only_block_sizes_every_engine_loads(tmp_path, group):
    """A folder the converter writes loads on every engine; a block size some engine cannot run is
    refused at conversion with the engine named (a g16 folder once converted and then failed to load)."""
    import edgeact
    from edgeact.converters.convert import convert
    from edgeact.converters.model import ConversionError
    from edgeact.converters.random_model import random_source

    src = random_source("tiny", seed=3)
    if group not in contract.block_sizes():
        with pytest.raises(ConversionError, match=f"group size {group} is not supported by the .*engine"):
            convert(src, tmp_path / "m", quant="int4", group_size=group, progress=False)
        return
    out = convert(src, tmp_path / "m", quant="int4", group_size=group, progress=False)
    ids = [1, 2, 3, 40, 5]
    ref = edgeact.load(out, engine="ort").forward(ids)
    if native_available():
        assert np.abs(edgeact.load(out, engine="native").forward(ids) - ref).max() < 5e-2


@pytest.mark.parametrize("engine", contract.ENGINES)
@pytest.mark.parametrize("group", [16, 32, 64, 128])   # every block size the packer writes
def test_block_sizes_per_engine_are_what_the_engine_runs(tmp_path, engine, group):
    """contract.BLOCK_SIZES[engine] is the set of MatMulNBits block sizes the engine loads (the
    writer itself, below the converter's check, writes any size the packer knows)."""
    import edgeact
    from edgeact.converters.onnx_writer import write_onnx
    from edgeact.converters.random_model import random_source

    if engine == "native" and not native_available():
        pytest.skip("native runtime not built")
    src = random_source("tiny", seed=3)
    facts = write_onnx(src, tmp_path, quant="int4", group_size=group, progress=False)
    if engine == "ort":
        import onnxruntime as ort

        load = lambda: ort.InferenceSession(str(tmp_path / contract.MODEL_FILE))  # noqa: E731
    else:
        from edgeact.runtime import NativeModel

        load = lambda: NativeModel(tmp_path)  # noqa: E731
    assert facts["quantization"]["group_size"] == group
    if group in contract.BLOCK_SIZES[engine]:
        load()
    else:
        with pytest.raises(Exception, match="block_size"):
            load()


def test_folder_format_version_is_checked(tmp_path):
    import json
    import shutil

    import edgeact
    from edgeact.converters.convert import convert
    from edgeact.converters.random_model import random_source

    out = convert(random_source("tiny"), tmp_path / "m", quant="int4", progress=False)
    newer = tmp_path / "newer"
    shutil.copytree(out, newer)
    card = json.loads((newer / contract.META_FILE).read_text())
    card["format_version"] = contract.FORMAT_VERSION + 1
    (newer / contract.META_FILE).write_text(json.dumps(card))
    for engine in ["ort"] + (["native"] if native_available() else []):
        with pytest.raises(ValueError, match="format_version 2; this edgeact .* reads up to 1"):
            edgeact.load(newer, engine=engine)
    if native_available():
        from edgeact.runtime import ModelFormatError, NativeModel

        with pytest.raises(ModelFormatError, match="format_version"):
            NativeModel(newer)
