"""`edgeact convert SRC -o OUT`: a source checkpoint → a model folder.

The options are declared here (no converter import, so the parser is cheap); `run` reads the
source once, samples the calibration text once and shares it between AWQ and sparsity
calibration, and has the converter check the finished folder in every engine of this install
before it is renamed into place (edgeact.verify).
"""
from __future__ import annotations

import argparse

from edgeact.commands import COMMANDS

QUANTS = ("fp32", "fp16", "int8", "int4")
QUANT_DEFAULT = "source"
QUANT_METHODS = ("rtn", "awq", "imatrix", "gptq", "awq+gptq")
SPARSITY_METHODS = ("teal", "chess", "wina", "cats", "coreinfer")
CALIB_TOKENS = 1024


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help=COMMANDS["convert"],
                       description="Read a checkpoint and write an ONNX model folder (model.onnx, "
                       "tokenizer.json, edgeact.json) with 4-bit/8-bit blockwise weights (MatMulNBits), a KV cache "
                       "and steering points. Supported sources: GGUF files (llama, qwen2, qwen3, phi3, gemma3), "
                       "Hugging Face folders (Llama, Mistral, Qwen2, Qwen3, Phi3, Gemma2, Gemma3 ...ForCausalLM), "
                       "llama2.c checkpoints (.bin). "
                       "The folder is checked by loading it in every engine of this install (native, onnxruntime) "
                       "before it is written into place.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("source", help="checkpoint: a .gguf file, a Hugging Face folder, or a llama2.c .bin")
    p.add_argument("-o", "--output", required=True, help="output model folder (written atomically)")
    p.add_argument("--quant", choices=QUANTS + (QUANT_DEFAULT,), default=QUANT_DEFAULT,
                   help="weight precision of the linear layers; source: a quantized GGUF's own blocks, imported "
                   "without rounding them again where MatMulNBits holds their grid (edgeact.json lists what was "
                   "re-rounded), int4 for a float source (and with --method awq)")
    p.add_argument("--group-size", type=int, default=None,
                   help="quantization block along K for int4/int8: 32, 64 or 128, sizes every engine runs "
                        "(default 32)")
    p.add_argument("--symmetric", action="store_true", help="no zero points (symmetric int4/int8)")
    p.add_argument("--lm-head", choices=QUANTS, default=None,
                   help="lm_head precision (default: int8 for int4/int8 weights, else the weights' precision)")
    p.add_argument("--embedding", choices=("fp32", "fp16", "shared"), default=None,
                   help="embedding table: shared, a tied model's one quantized table, lm_head's, which the lookup "
                        "reads too (the default for a tied model with a quantized lm_head); fp16 or fp32, a float "
                        "table of its own (the default otherwise: fp32 for fp32 weights, else fp16)")
    p.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=None,
                   help="MatMulNBits accuracy_level for int4/int8: 4 quantizes activations to int8 per block "
                        "(the fast path; default 4)")
    p.add_argument("--tokenizer", default=None, help="llama2.c tokenizer.bin (default: one beside the checkpoint)")
    p.add_argument("--max-context", type=int, default=None,
                   help="context length the rope caches cover (default: the model's, at most 8192)")
    p.add_argument("--external-data", action="store_true",
                   help="weights in model.onnx.data, 64-byte aligned (automatic above 16 MiB)")
    p.add_argument("--no-steering", action="store_true", help="omit the steering points")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    g = p.add_argument_group("quantization method")
    g.add_argument("--method", choices=QUANT_METHODS, default="rtn",
                   help="rtn: round to nearest; awq: activation-aware scaling (+ clipping) on calibration text; "
                   "imatrix: int4 with float zero points, each block's scale and minimum searched for the lowest "
                   "error weighted by the input's mean square on calibration text; gptq: error-compensating "
                   "rounding (each column's rounding error moved onto the columns not yet rounded, by the "
                   "calibration inputs' second moments); awq+gptq: AWQ's scaling, then GPTQ's rounding")
    g.add_argument("--no-awq-clip", dest="awq_clip", action="store_false",
                   help="with --method awq or awq+gptq: skip AWQ's clipping search (it runs by default)")
    g.add_argument("--float-zero-points", action="store_true",
                   help="with --method rtn, gptq or awq+gptq at int4: each block's grid spans its own [min, "
                   "max] (an fp16 scale and minimum) instead of an integer zero point's range widened to include "
                   "0; imatrix always does this")

    g = p.add_argument_group("mixed bits under a size budget")
    g.add_argument("--target-bpw", type=float, default=None, metavar="BITS",
                   help="average bits per weight of the linear layers and lm_head (scales and zero points "
                   "included); each tensor gets the format that buys the most accuracy per byte")
    g.add_argument("--max-size", type=float, default=None, metavar="MB",
                   help="the whole folder's weights at most this many MB (10^6 bytes)")

    g = p.add_argument_group("activation sparsity")
    g.add_argument("--sparsity", default=None, metavar="S",
                   help="target share of zeroed input channels: 0.5, or per layer type attn=0.4,ffn=0.5 "
                        "(default: dense)")
    g.add_argument("--sparsity-method", choices=SPARSITY_METHODS, default=None,
                   help="with --sparsity (default teal): teal: |x| per tensor; chess: per channel; wina: |x|·‖W "
                        "col‖; cats: gated-FFN activation; coreinfer: the FFN neurons the prompt used most, fixed "
                        "after prefill (no calibration)")

    g = p.add_argument_group("calibration (AWQ, imatrix and sparsity share one sample)")
    g.add_argument("--calib", default=None, metavar="FILE",
                   help="calibration text (default: text the fp32 model samples itself, fixed seed)")
    g.add_argument("--calib-tokens", type=int, default=None,
                   help=f"calibration tokens (default {CALIB_TOKENS})")


def check_args(args) -> None:
    """Settings that would be silently ignored, or that no converter accepts, are errors."""
    int_weights = args.quant in ("int4", "int8", QUANT_DEFAULT) or args.lm_head in ("int4", "int8")
    for flag, given in (("--group-size", args.group_size is not None), ("--symmetric", args.symmetric),
                        ("--accuracy-level", args.accuracy_level is not None)):
        if given and not int_weights:
            raise ValueError(f"{flag} applies to int4/int8 weights, and --quant {args.quant} "
                             f"(lm_head {args.lm_head or args.quant}) has none")
    if args.max_context is not None and args.max_context < 1:
        raise ValueError(f"--max-context must be a positive number of tokens, not {args.max_context}")
    if args.sparsity_method is not None and args.sparsity is None:
        raise ValueError(f"--sparsity-method {args.sparsity_method} needs --sparsity S "
                         "(the share of channels to zero, e.g. 0.5)")
    if not args.awq_clip and args.method not in ("awq", "awq+gptq"):
        raise ValueError("--no-awq-clip applies to --method awq and awq+gptq")
    if args.float_zero_points:
        if args.method not in ("rtn", "gptq", "awq+gptq"):
            raise ValueError(f"--float-zero-points applies to --method rtn, gptq and awq+gptq (imatrix always "
                             f"writes float zero points; AWQ rounds to nearest with integer ones), not {args.method}")
        if args.quant not in ("int4", QUANT_DEFAULT) or args.symmetric:
            raise ValueError("--float-zero-points is for asymmetric int4: not with --quant "
                             f"{args.quant}" + (" and --symmetric" if args.symmetric else ""))
        if args.target_bpw is not None or args.max_size is not None:
            raise ValueError("--float-zero-points does not combine with --target-bpw/--max-size (the budget "
                             "picks each tensor's format)")
    if args.method != "rtn" and args.quant not in ("int4", "int8", QUANT_DEFAULT):
        raise ValueError(f"--method {args.method} needs --quant int4 or int8, not {args.quant}")
    if args.method in ("gptq", "awq+gptq") and (args.target_bpw is not None or args.max_size is not None):
        raise ValueError(f"--method {args.method} rounds every linear at --quant's bits: it does not combine with "
                         "--target-bpw/--max-size")
    calibrates = (args.method != "rtn" or args.target_bpw is not None or args.max_size is not None
                  or (args.sparsity is not None and args.sparsity_method != "coreinfer"))
    for flag, given in (("--calib", args.calib is not None), ("--calib-tokens", args.calib_tokens is not None)):
        if given and not calibrates:
            raise ValueError(f"{flag} applies to --method awq/imatrix/gptq/awq+gptq, --target-bpw/--max-size and calibrated "
                             "--sparsity (teal, chess, wina, cats); nothing here is calibrated")
    if args.calib_tokens is not None and args.calib_tokens < 2:
        raise ValueError(f"--calib-tokens must be at least 2, not {args.calib_tokens}")


def run(args) -> int:
    from pathlib import Path

    check_args(args)
    if Path(args.output).exists() and not args.overwrite:
        raise ValueError(f"output {args.output} already exists; add --overwrite to replace it")
    from edgeact.converters.convert import convert, validate_options
    from edgeact.verify import verify_folder

    kw = dict(quant=args.quant, group_size=args.group_size or 32, symmetric=args.symmetric, lm_head=args.lm_head,
              embedding=args.embedding, accuracy_level=4 if args.accuracy_level is None else args.accuracy_level,
              max_context=args.max_context, progress=not args.quiet, overwrite=args.overwrite,
              steering=not args.no_steering, verify=verify_folder)
    if args.external_data:
        kw["external_data"] = True
    progress = not args.quiet
    sparse_method = args.sparsity_method or "teal"
    targets = None
    if args.sparsity is not None:
        from edgeact.converters.sparsity import parse_targets

        targets = parse_targets(args.sparsity, sparse_method)
    source = args.source
    if (args.method != "rtn" or targets is not None or args.target_bpw is not None or args.max_size is not None
            or args.float_zero_points):
        from edgeact.converters.readers import read_source

        validate_options(kw["quant"], kw["group_size"], kw["lm_head"], kw["embedding"])   # before calibrating
        source = read_source(source, tokenizer=args.tokenizer)
        model = ids = None
        if args.method != "rtn" or (targets is not None and sparse_method != "coreinfer"):
            from edgeact.converters.calibration import calibration_ids
            from edgeact.converters.torch_ref import build_torch_model

            model = build_torch_model(source, progress=progress)
            ids = calibration_ids(source, model, text_file=args.calib, n_tokens=args.calib_tokens or CALIB_TOKENS,
                                  progress=progress)
        if args.method == "awq":
            from edgeact.converters.awq import awq_transform

            if kw["quant"] == QUANT_DEFAULT:   # AWQ's scaled weights are floats: they are quantized to int4
                kw["quant"] = "int4"

            source, kw["calibration"] = awq_transform(
                source, bits=4 if kw["quant"] == "int4" else 8, group_size=kw["group_size"], symmetric=args.symmetric,
                calib_ids=ids, calib_file=args.calib, clip=args.awq_clip, progress=progress, model=model)
            kw["method"] = "awq"
            model = None   # AWQ changed the weights: sparsity calibrates on the transformed model
        if args.method == "rtn" and args.float_zero_points:
            from edgeact.converters.mixed import linear_names
            from edgeact.converters.quantize import float_minimum_override

            kw["quant"] = "int4"
            kw["linear_override"] = float_minimum_override(
                source, [n for n in linear_names(source) if n != "lm_head.weight"], kw["group_size"])
        if args.method in ("gptq", "awq+gptq"):
            from edgeact.converters.gptq import gptq_transform

            if kw["quant"] == QUANT_DEFAULT:   # GPTQ rounds float weights afresh: to int4 by default
                kw["quant"] = "int4"
            source, override, kw["calibration"] = gptq_transform(
                source, bits=4 if kw["quant"] == "int4" else 8, group_size=kw["group_size"], symmetric=args.symmetric,
                awq=args.method == "awq+gptq", clip=args.awq_clip, float_zero_points=args.float_zero_points,
                calib_ids=ids, calib_file=args.calib, progress=progress, model=model)
            kw["linear_override"] = {**override, **(kw.get("linear_override") or {})}
            kw["method"] = args.method
            model = None   # its layers now hold the quantized weights
        if args.method == "imatrix":
            from edgeact.converters.imatrix import imatrix_override

            if kw["quant"] == QUANT_DEFAULT:
                kw["quant"] = "int4"
            if kw["quant"] != "int4" or args.symmetric:
                raise ValueError("--method imatrix writes int4 with float zero points: not with --quant int8 "
                                 "or --symmetric")
            override, kw["calibration"] = imatrix_override(source, group_size=kw["group_size"], calib_ids=ids,
                                                           calib_file=args.calib, progress=progress, model=model)
            kw["linear_override"] = {**override, **(kw.get("linear_override") or {})}
            kw["method"] = "imatrix"
        if args.target_bpw is not None or args.max_size is not None:
            from edgeact.converters import mixed

            source, kw = mixed.convert_kwargs(args, source, kw)
        if targets is not None:
            from edgeact.converters.sparsity import calibrate

            kw["sparsity"] = calibrate(source, sparse_method, targets, calib_ids=ids, calib_file=args.calib,
                                       progress=progress, model=model)
    else:
        kw["tokenizer"] = args.tokenizer
    out = convert(source, args.output, **kw)
    print(f"wrote {out}")
    return 0
