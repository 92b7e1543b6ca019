"""Python face of the native C runtime (native/): the cffi binding and a thin session class.

`available()` says whether the compiled extension is importable; everything
else needs it (import errors name the reason).
"""
from __future__ import annotations

try:
    from . import _native  # noqa: F401
    _IMPORT_ERROR: str | None = None
except ImportError as e:   # not compiled (no C compiler at install) or built for another Python
    _IMPORT_ERROR = f"edgeact native runtime is not built ({e}); reinstall with a C compiler available " \
                    "(pip install -e .) or run `python runtime/build_ffi.py`"


def available() -> bool:
    return _IMPORT_ERROR is None


def unavailable_reason() -> str | None:
    return _IMPORT_ERROR


if _IMPORT_ERROR is None:
    from .session import (ContextOverflowError, ModelFormatError, NativeError, NativeModel, NativeSession,  # noqa: F401
                          QMatMul, default_isa, format_profile, measure_read_bandwidth,
                          measure_rows_read_bandwidth, physical_cores, profile_by_op, version)
else:
    def __getattr__(name):
        if name in ("NativeModel", "NativeSession", "QMatMul", "NativeError", "ModelFormatError",
                    "ContextOverflowError", "format_profile", "profile_by_op", "measure_read_bandwidth",
                    "measure_rows_read_bandwidth", "version", "physical_cores", "default_isa"):
            raise ImportError(_IMPORT_ERROR)
        raise AttributeError(name)
