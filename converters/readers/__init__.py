"""Source readers: every supported checkpoint format → SourceModel (converters/model.py).

    read_source(path, tokenizer=None) -> SourceModel
dispatches on what `path` is: a `.gguf` file, a Hugging Face folder (config.json),
or a llama2.c `.bin` checkpoint.
"""
from __future__ import annotations

from pathlib import Path

from ..model import ConversionError, SourceModel

SUPPORTED_SOURCES = ("llama, mistral, qwen2 via Hugging Face folders (config.json + safetensors); "
                     "llama via GGUF; llama2.c .bin checkpoints")


def read_source(path: str | Path, tokenizer: str | Path | None = None) -> SourceModel:
    """Open a source checkpoint lazily; `tokenizer` overrides the llama2.c tokenizer.bin location."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"source {path} does not exist")
    if tokenizer is not None and not (path.is_file() and path.suffix == ".bin"):
        raise ConversionError("a separate tokenizer file is only used with llama2.c .bin checkpoints")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConversionError(f"{path} is a folder without config.json; supported sources: {SUPPORTED_SOURCES}")
        from .hf_reader import read_hf_folder

        return read_hf_folder(path)
    if path.suffix == ".gguf":
        from .gguf_reader import read_gguf

        return read_gguf(path)
    if path.suffix == ".bin":
        from .llama2c_reader import read_llama2c

        return read_llama2c(path, tokenizer)
    raise ConversionError(f"cannot tell the format of {path}; supported sources: {SUPPORTED_SOURCES}")


__all__ = ["read_source", "SUPPORTED_SOURCES", "ConversionError"]


def ensure_source(source, kw: dict):
    """A SourceModel for `source` (a path or an already-read model); consumes kw['tokenizer'],
    which only applies to reading a path. Used by converter extensions (mixed bits)."""
    tokenizer = kw.pop("tokenizer", None)
    if isinstance(source, SourceModel):
        return source
    return read_source(source, tokenizer=tokenizer)
