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

from ..contract import ENGINES, FORMAT, FORMAT_VERSION, VERSION, check_block_size
from .model import SUPPORTED_ARCHITECTURES, ConversionError, SourceModel
from .onnx_writer import EMBEDDING_KINDS, QUANT_KINDS, default_lm_head, write_onnx


SOURCE = "source"   # keep a quantized source's own blocks (readers/gguf_blocks.py)


def validate_options(quant: str, group_size: int, lm_head: str | None, embedding: str | None,
                     engines=ENGINES) -> None:
    if quant not in QUANT_KINDS + (SOURCE,):
        raise ConversionError(f"unknown quant {quant!r}; choose one of {', '.join(QUANT_KINDS + (SOURCE,))}")
    if lm_head is not None and lm_head not in QUANT_KINDS:
        raise ConversionError(f"unknown lm_head type {lm_head!r}; choose one of {', '.join(QUANT_KINDS)}")
    if embedding is not None and embedding not in EMBEDDING_KINDS:
        raise ConversionError(f"unknown embedding type {embedding!r}; choose one of {', '.join(EMBEDDING_KINDS)}")
    why = check_block_size(group_size, engines)   # a folder must load on every engine it is written for
    if why:
        raise ConversionError(why)


def model_card(src: SourceModel, facts: dict, has_tokenizer: bool) -> dict:
    """The edgeact.json contents (schema in docs/model-folder.md)."""
    cfg = src.config
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "converter_version": VERSION,
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


def source_precision(src: SourceModel, linear_override: dict | None):
    """quant="source": every linear stored quantized in the source is imported as it is
    (gguf_blocks); linears stored as floats stay fp16. Returns the writer's base quant, the
    override loaders and the edgeact.json report, which fills in as the loaders run."""
    from collections import Counter

    if not src.quantized:
        return "int4", linear_override, {"weights": "int4", "note": "the source is not quantized: int4 RTN"}
    report = {"weights": SOURCE, "imported": Counter(), "re_rounded": []}
    override = dict(linear_override or {})

    def lazy(name: str, key: str):
        def load():
            im = src.quantized[key]()
            zp = "float zero points" if im.qw.float_zero_points else "symmetric" if im.qw.zero_points is None else "zp"
            report["imported"][f"{im.source_type} -> int{im.qw.bits} g{im.qw.block_size} {zp}"] += 1
            if im.note:
                report["re_rounded"].append(f"{name}: {im.note}")
            return im.qw
        return load

    for name in src.quantized:
        if name != "model.embed_tokens.weight" and name not in override:
            override[name] = lazy(name, name)
    tied = src.config.tie_word_embeddings and "lm_head.weight" not in src.tensors
    if tied and "model.embed_tokens.weight" in src.quantized and "lm_head.weight" not in override:
        override["lm_head.weight"] = lazy("lm_head.weight", "model.embed_tokens.weight")
    if "lm_head.weight" in override:
        report["lm_head"] = SOURCE
    if "model.embed_tokens.weight" in src.quantized:
        report["re_rounded"].append("model.embed_tokens.weight: the source's quantized values rounded to the "
                                    "embedding table's float type")
    return "fp16", override, report


def convert(src_path, out_dir, *, quant: str = "int4", group_size: int = 32, symmetric: bool = False,
            lm_head: str | None = None, embedding: str | None = None, accuracy_level: int = 4,
            tokenizer=None, max_context: int | None = None, progress: bool = True, overwrite: bool = False,
            calibration: dict | None = None, mixed: dict | None = None, verify=None, **writer_kw) -> Path:
    """Convert `src_path` (a path read_source understands, or an already-read SourceModel) into `out_dir`.

    Raises ConversionError (one line) for bad input; on any failure no folder is left behind.
    `calibration` is recorded verbatim in edgeact.json (AWQ/GPTQ provenance); `verify(folder)`
    runs on the complete folder before it is renamed into place and raises if it does not load;
    other keyword arguments go to write_onnx (external_data, steering, linear_override, method).
    """
    validate_options(quant, group_size, lm_head, embedding)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ConversionError(f"output {out} already exists; pass overwrite=True to replace it")
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

    source_report = None
    if quant == SOURCE:
        quant, writer_kw["linear_override"], source_report = source_precision(src, writer_kw.get("linear_override"))
        writer_kw.setdefault("method", SOURCE if source_report["weights"] == SOURCE else "rtn")
        if source_report["weights"] == SOURCE:
            # a tied source's quantized embedding is lm_head's table; shared (the default), it is also the
            # lookup's, the source's own blocks. "int8" names a quantized head for the writer's checks; the
            # imported blocks set the actual bits. A float lm_head stays fp16.
            lm_head = lm_head or ("int8" if source_report.get("lm_head") == SOURCE else "fp16")

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        facts = write_onnx(src, tmp, quant=quant, group_size=group_size, symmetric=symmetric,
                           lm_head=lm_head or default_lm_head(quant), embedding=embedding,
                           accuracy_level=accuracy_level, max_context=max_context, progress=progress, **writer_kw)
        if calibration is not None:
            facts["calibration"] = calibration
        if mixed is not None:   # converters/mixed.py's per-tensor formats (in linear_override)
            facts["quantization"].update(mixed)
        if source_report is not None:
            if facts["quantization"]["embedding"] == "shared":   # the source's embedding blocks, not re-rounded
                source_report["re_rounded"] = [r for r in source_report.get("re_rounded", [])
                                               if not r.startswith("model.embed_tokens.weight")]
            facts["quantization"].update({**source_report, "imported": dict(source_report.get("imported", {}))})
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
