"""cffi API-mode build of the native runtime as edgeact.runtime._native.

Used by setup.py (cffi_modules); run directly (`python runtime/build_ffi.py`)
to build the extension in place for development.
"""
from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent.parent
NATIVE = ROOT / "native"
HEADERS = [NATIVE / "include" / "edgeact.h", NATIVE / "include" / "edgeact_tools.h"]


def _cdef() -> str:
    parts = []
    for header in HEADERS:
        text = header.read_text(encoding="utf-8")
        start, end = text.index("/* cdef-begin */"), text.index("/* cdef-end */")
        parts.append(text[start + len("/* cdef-begin */"):end])
    return "\n".join(parts)


def _require_compiler() -> None:
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None and shutil.which("cc") is None and shutil.which("gcc") is None:
        raise SystemExit(f"edgeact: no C compiler found (looked for {cc!r}, cc, gcc); the native runtime is compiled "
                         "at install time: install gcc or clang (e.g. apt-get install build-essential) and retry")


def _sources(absolute: bool) -> list[str]:
    """native/sources.txt: the one list of runtime sources (also read by native/Makefile and android-demo)."""
    lines = (NATIVE / "sources.txt").read_text(encoding="utf-8").splitlines()
    srcs = [NATIVE / ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    # setuptools wants paths relative to setup.py; a direct build compiles from a temporary directory
    return [str(p) if absolute else str(p.relative_to(ROOT)) for p in srcs]


ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "edgeact.runtime._native",
    '#include "edgeact.h"\n#include "edgeact_tools.h"\n',
    sources=_sources(__name__ == "__main__"),
    include_dirs=[str(NATIVE / "include")],
    extra_compile_args=["-O2", *(NATIVE / "cflags.txt").read_text(encoding="utf-8").split()],
    extra_link_args=["-pthread", "-lm"],
)

if __name__ == "__main__":
    _require_compiler()
    tmp = ROOT / "build" / "cffi"
    built = Path(ffibuilder.compile(tmpdir=str(tmp), verbose=False))
    for stale in (ROOT / "runtime").glob("_native*.so"):   # e.g. an abi3 build from pip would shadow or be shadowed
        stale.unlink()
    shutil.copy2(built, ROOT / "runtime" / built.name)
    print(ROOT / "runtime" / built.name)
else:
    _require_compiler()
