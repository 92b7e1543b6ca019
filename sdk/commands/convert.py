"""`edgeact convert SRC -o OUT`: a source checkpoint → a model folder."""
from __future__ import annotations

import argparse

from edgeact.commands import COMMANDS

QUANTS = ("fp32", "fp16", "int8", "int4")
QUANT_DEFAULT = "source"


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help=COMMANDS["convert"],
                       description="Read a checkpoint and write an ONNX model folder (model.onnx, "
                       "tokenizer.json, edgeact.json) with 4-bit/8-bit blockwise weights (MatMulNBits), a KV cache "
                       "and steering points. Supported sources: GGUF files (llama, qwen2, qwen3, phi3, gemma3), "
                       "Hugging Face folders (Llama, Mistral, Qwen2, Qwen3, Phi3, Gemma2, Gemma3 ...ForCausalLM), "
                       "llama2.c checkpoints (.bin).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("source", help="checkpoint: a .gguf file, a Hugging Face folder, or a llama2.c .bin")
    p.add_argument("-o", "--output", required=True, help="output model folder (written atomically)")
    p.add_argument("--quant", choices=QUANTS + (QUANT_DEFAULT,), default=QUANT_DEFAULT,
                   help="weight precision of the linear layers; source: a quantized GGUF's own blocks, imported "
                   "without rounding them again where MatMulNBits holds their grid (edgeact.json lists what was "
                   "re-rounded), int4 for a float source")
    p.add_argument("--group-size", type=int, default=32, help="quantization block along K (32, 64 or 128: sizes every engine runs)")
    p.add_argument("--symmetric", action="store_true", help="no zero points (symmetric int4/int8)")
    p.add_argument("--lm-head", choices=QUANTS, default=None, help="lm_head precision (default int8 for int4/int8)")
    p.add_argument("--embedding", choices=("fp32", "fp16", "shared"), default=None,
                   help="embedding table precision; shared: a tied model's one quantized table, read by lm_head too")
    p.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=4,
                   help="MatMulNBits accuracy_level: 4 quantizes activations to int8 per block (fast path)")
    p.add_argument("--tokenizer", default=None, help="llama2.c tokenizer.bin (default: one beside the checkpoint)")
    p.add_argument("--max-context", type=int, default=None,
                   help="context length the rope caches cover (default: the model's, at most 8192)")
    p.add_argument("--external-data", action="store_true", help="weights in model.onnx.data, 64-byte aligned (automatic above 16 MiB)")
    p.add_argument("--no-steering", action="store_true", help="omit the steering points")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    for extra in _extensions():
        extra.add_convert_args(p)


def _extensions():
    """Converter options contributed by other modules (AWQ/GPTQ, activation sparsity)."""
    mods = []
    for name in ("edgeact.converters.awq", "edgeact.converters.mixed", "edgeact.converters.sparsity"):
        try:
            mod = __import__(name, fromlist=["_"])
        except ImportError:
            continue
        if hasattr(mod, "add_convert_args") and hasattr(mod, "convert_kwargs"):
            mods.append(mod)
    return mods


def run(args) -> int:
    from pathlib import Path

    from edgeact.converters.convert import convert

    if Path(args.output).exists() and not args.overwrite:
        raise ValueError(f"output {args.output} already exists; add --overwrite to replace it")

    kw = dict(quant=args.quant, group_size=args.group_size, symmetric=args.symmetric, lm_head=args.lm_head,
              embedding=args.embedding, accuracy_level=args.accuracy_level, tokenizer=args.tokenizer,
              max_context=args.max_context, progress=not args.quiet, overwrite=args.overwrite,
              steering=not args.no_steering)
    if args.external_data:
        kw["external_data"] = True
    source = args.source
    for extra in _extensions():
        source, kw = extra.convert_kwargs(args, source, kw)
    out = convert(source, args.output, **kw)
    print(f"wrote {out}")
    return 0
