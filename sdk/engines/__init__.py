"""Engines run a model folder: `ort` (onnxruntime, the reference) and `native` (the C runtime)."""
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
    raise ValueError(f"unknown engine {engine!r}; choose auto, native or ort")
