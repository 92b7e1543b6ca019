"""Optional dependencies: which pip extra brings which module, and the one-line error when one is missing.

The device install (`pip install edgeact`) runs a converted folder on the native runtime, with
steering; converting, evaluating, the onnxruntime engine and sweeps need the `convert` extra,
the HTTP server and JSON-schema output the `serve` extra."""
from __future__ import annotations

import importlib
import importlib.util

EXTRA_OF = {**{m: "convert" for m in ("torch", "transformers", "accelerate", "safetensors", "gguf", "onnx",
                                       "onnxruntime", "sentencepiece", "matplotlib")},
            **{m: "serve" for m in ("fastapi", "uvicorn", "llguidance")}}


class MissingExtra(ModuleNotFoundError):
    """An optional module is not installed; the message names the extra that brings it."""


def install_hint(module: str) -> str:
    return f'pip install "edgeact[{EXTRA_OF.get(module.split(".")[0], "convert")}]"'


def missing_message(module: str, what: str | None = None) -> str:
    root = module.split(".")[0]
    need = f"{what} needs {root}" if what else f"{root} is needed here"
    return f"{need}, which the device install leaves out: {install_hint(root)}"


def is_optional(exc: BaseException) -> bool:
    """A ModuleNotFoundError for one of the extras' modules (not a bug in edgeact's own imports)."""
    name = getattr(exc, "name", None) or ""
    return isinstance(exc, ModuleNotFoundError) and name.split(".")[0] in EXTRA_OF


def require(module: str, what: str | None = None):
    """import_module(module), or MissingExtra naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if is_optional(e):
            raise MissingExtra(missing_message(e.name, what), name=e.name) from None
        raise


def first_missing(modules) -> str | None:
    """The first of `modules` that is not installed (found without importing it)."""
    for m in modules:
        try:
            if importlib.util.find_spec(m) is None:
                return m
        except (ImportError, ValueError):  # an import hook that refuses the module
            return m
    return None
