"""Only declares the cffi extension (the native runtime); everything else is in pyproject.toml."""
from setuptools import setup

setup(cffi_modules=["runtime/build_ffi.py:ffibuilder"])
