"""convert(): source checkpoint → complete model folder (model.onnx, tokenizer.json, edgeact.json).

The folder is built under OUT.tmp-<pid> and renamed into place only when
complete and checked, so a failed or interrupted conversion never leaves a
half-written OUT, and a folder that does not load is never left either.

Checks before the rename: the writer's own checks (onnx.checker, every Sparsify's
width) and, when given, `verify(folder)`: the SDK passes one that loads the folder
in every engine it has (native planner, onnxruntime) and runs a token. The engines
live outside this package (converters never import the runtime or the SDK), and
onnx's shape inference alone cannot catch a width mismatch behind a contrib op
such as GroupQueryAttention, whose output shape only onnxruntime knows.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .. import __version__   # the package __init__ only (edgeact/__init__.py), not SDK modules
from .model import SUPPORTED_ARCHITECTURES, ConversionError, SourceModel
from .onnx_writer import EMBEDDING_KINDS, QUANT_KINDS, default_embedding, default_lm_head, write_onnx
from .quantize import BLOCK_SIZES

FORMAT = "edgeact-model"
FORMAT_VERSION = 1


def validate_options(quant: str, group_size: int, lm_head: str | None, embedding: str | None) -> None:
    if quant not in QUANT_KINDS:
        raise ConversionError(f"unknown quant {quant!r}; choose one of {', '.join(QUANT_KINDS)}")
    if lm_head is not None and lm_head not in QUANT_KINDS:
        raise ConversionError(f"unknown lm_head type {lm_head!r}; choose one of {', '.join(QUANT_KINDS)}")
    if embedding is not None and embedding not in EMBEDDING_KINDS:
        raise ConversionError(f"unknown embedding type {embedding!r}; choose one of {', '.join(EMBEDDING_KINDS)}")
    if group_size not in BLOCK_SIZES:
        raise ConversionError(f"group size {group_size} not supported; choose one of "
                              f"{', '.join(map(str, BLOCK_SIZES))}")


def model_card(src: SourceModel, facts: dict, has_tokenizer: bool) -> dict:
    """The edgeact.json contents (schema in docs/model-folder.md)."""
    cfg = src.config
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "converter_version": __version__,
        "config": cfg.to_dict(),
        "max_context": facts["max_context"],
        "quantization": facts["quantization"],
        "sparsity": facts.get("sparsity"),
        "steering": facts.get("steering"),
        "external_data": facts.get("external_data", False),
        "kv_cache": facts["kv_cache"],
        "tokenizer": {
            "file": "tokenizer.json" if has_tokenizer else None,
            "bos_token_id": cfg.bos_token_id, "eos_token_ids": list(cfg.eos_token_ids),
            "pad_token_id": cfg.pad_token_id,
            "add_bos_token": src.add_bos_token, "chat_template": src.chat_template,
        },
        "calibration": facts.get("calibration"),
        "source": dict(src.provenance),
    }


def convert(src_path, out_dir, *, quant: str = "int4", group_size: int = 32, symmetric: bool = False,
            lm_head: str | None = None, embedding: str | None = None, accuracy_level: int = 4,
            tokenizer=None, max_context: int | None = None, progress: bool = True, overwrite: bool = False,
            calibration: dict | None = None, verify=None, **writer_kw) -> Path:
    """Convert `src_path` (a path read_source understands, or an already-read SourceModel) into `out_dir`.

    Raises ConversionError (one line) for bad input; on any failure no folder is left behind.
    `calibration` is recorded verbatim in edgeact.json (AWQ/GPTQ provenance); `verify(folder)`
    runs on the complete folder before it is renamed into place and raises if it does not load;
    other keyword arguments go to write_onnx (external_data, steering, linear_override, method).
    """
    validate_options(quant, group_size, lm_head, embedding)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ConversionError(f"output {out} already exists; pass overwrite=True (--overwrite) to replace it")
    if isinstance(src_path, SourceModel):
        if tokenizer is not None:
            raise ConversionError("tokenizer= applies to a source path, not to an already-read SourceModel")
        src = src_path
    else:
        from .readers import read_source

        src = read_source(src_path, tokenizer=tokenizer)
    if src.config.arch not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(f"unsupported architecture {src.config.arch!r}; "
                              f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        facts = write_onnx(src, tmp, quant=quant, group_size=group_size, symmetric=symmetric,
                           lm_head=lm_head or default_lm_head(quant), embedding=embedding or default_embedding(quant),
                           accuracy_level=accuracy_level, max_context=max_context, progress=progress, **writer_kw)
        if calibration is not None:
            facts["calibration"] = calibration
        if src.tokenizer_json is not None:
            (tmp / "tokenizer.json").write_text(src.tokenizer_json, encoding="utf-8")
        card = model_card(src, facts, src.tokenizer_json is not None)
        (tmp / "edgeact.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if verify is not None:
            try:
                verify(tmp)
            except Exception as e:  # noqa: BLE001 - any engine's refusal fails the conversion
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ConversionError(f"the written model does not load, so no folder was written: {msg}") from e
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
