"""Engines run a model folder: `native` (the C runtime), `ort` (onnxruntime, the reference), and
the baselines `torch` and `llama.cpp-py` (llama-cpp-python on a GGUF of the same weights)."""
from .base import Engine, read_meta

__all__ = ["Engine", "read_meta", "make_engine", "native_available"]


def native_available() -> bool:
    try:
        from edgeact.runtime import available

        from . import native_engine  # noqa: F401
    except ImportError:
        return False
    return bool(available())


def make_engine(folder, engine: str = "auto", threads: int | None = None, **kw) -> Engine:
    """`auto` = the native runtime when it is built, else onnxruntime."""
    if engine == "auto":
        engine = "native" if native_available() else "ort"
    if engine == "ort":
        from .ort_engine import OrtEngine

        return OrtEngine(folder, threads=threads, **kw)
    if engine == "native":
        if not native_available():
            raise ValueError("the native runtime is not built in this install (pip install . compiles it; "
                             "a C compiler is needed); use engine='ort'")
        from .native_engine import NativeEngine

        return NativeEngine(folder, threads=threads, **kw)
    if engine == "torch":
        from .baselines import TorchEngine

        return TorchEngine(folder, threads=threads, **kw)
    if engine == "llama.cpp-py":
        from .baselines import LlamaCppEngine

        return LlamaCppEngine(folder, threads=threads, **kw)
    raise ValueError(f"unknown engine {engine!r}; choose auto, native, ort, torch or llama.cpp-py")
