"""`edgeact eval MODEL_DIR --ref SRC`: quality against the fp32 source on the same tokens."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgeact.commands import COMMANDS, thread_count


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help=COMMANDS["eval"],
                       description="Compare converted model folders with their fp32 source on the same tokens: mean "
                       "KL(ref‖model) of next-token distributions (nats/token), top-1 agreement, perplexity of both. "
                       "Tokens come from --text, or are sampled from the fp32 reference with a fixed seed.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("models", nargs="*", help="model folder(s) converted from the same source")
    p.add_argument("--ref", required=True, help="the source checkpoint (GGUF, HF folder, llama2.c .bin)")
    p.add_argument("--text", default=None, help="evaluation text file (default: text sampled from the reference)")
    p.add_argument("--tokens", type=int, default=256, help="number of tokens evaluated")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled text")
    p.add_argument("--engine", choices=("ort", "native", "auto"), default="ort",
                   help="engine that runs the folders: ort (onnxruntime, the reference), native, or auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--against-llama-cpp", default=None, metavar="TYPES",
                   help="also quantize the --ref GGUF with llama.cpp's own API to these types (comma-separated, "
                   "e.g. Q4_0,IQ4_XS,Q4_K_M,Q8_0), run each file and the source itself in llama.cpp, and compare "
                   "on the same tokens (needs llama-cpp-python)")
    p.add_argument("--llama-cpp-dir", default=None,
                   help="where llama.cpp's files are written and reused (default: the edgeact cache folder)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="save KL against size as a PNG (default with --against-llama-cpp: kl-vs-size.png)")
    p.add_argument("--no-ref-cache", action="store_true",
                   help="recompute the reference instead of reusing the tokens and fp32 logits kept from an earlier "
                   "run on the same source file and settings (kept in the edgeact cache folder, eval-reference/)")
    p.add_argument("--threads", type=thread_count, default=2, help="threads for llama.cpp's quantizer and engine")


def read_text(path, what: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what} {p} not found" if not p.exists() else f"{what} {p} is not a file")
    data = p.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {p} is not UTF-8: byte 0x{data[e.start]:02x} at offset {e.start}") from None


def run(args) -> int:
    from edgeact.engines.base import read_meta

    if args.tokens < 2:
        raise ValueError(f"--tokens must be at least 2, not {args.tokens}")
    if args.seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, not {args.seed}")
    if not args.models and not args.against_llama_cpp:
        raise ValueError("give model folder(s), --against-llama-cpp TYPES, or both")
    if args.against_llama_cpp and Path(args.ref).suffix != ".gguf":
        raise ValueError("--against-llama-cpp quantizes the --ref file, which must be a .gguf")
    metas = [read_meta(folder) for folder in args.models]   # a wrong folder fails before the reference is built
    text = read_text(args.text, "evaluation text") if args.text else None
    from tqdm import tqdm

    from edgeact.evaluate import Reference, against_llama_cpp, folder_bytes, plot_kl_vs_size

    progress = not (args.quiet or args.json)
    from edgeact.default_model import cache_dir

    ref = Reference(args.ref, text=text, n_tokens=args.tokens, seed=args.seed, progress=progress,
                    cache_dir=None if args.no_ref_cache else cache_dir() / "eval-reference")
    rows = []
    bar = tqdm(list(zip(args.models, metas)), desc="evaluating", unit="folder", disable=not progress)
    for folder, meta in bar:
        bar.set_postfix_str(Path(folder).name)
        q = ref.compare(folder, engine=args.engine)
        rows.append({"model": folder, "quantization": meta.get("quantization"), "sparsity": meta.get("sparsity"),
                     "bytes": folder_bytes(folder), **q.to_dict()})
    bar.close()
    if args.against_llama_cpp:
        types = [t.strip() for t in args.against_llama_cpp.split(",") if t.strip()]
        workdir = Path(args.llama_cpp_dir) if args.llama_cpp_dir else cache_dir() / "llama-cpp"
        rows += against_llama_cpp(ref, args.ref, types, workdir, threads=args.threads)
    plot = args.plot or ("kl-vs-size.png" if args.against_llama_cpp else None)
    if plot:
        plot_kl_vs_size(rows, plot, title=f"{Path(args.ref).name}: {rows[0]['n_tokens']} tokens")
    if args.json:
        print(json.dumps({"reference": args.ref, "engine": args.engine,
                          "tokens": "text" if text else f"sampled (seed {args.seed})", "results": rows}, indent=2))
        return 0
    print(f"reference: {args.ref}   tokens: {rows[0]['n_tokens']} ({'text' if text else 'sampled'})   engine: {args.engine}")
    print(f"{'model':40s} {'KL nats/tok':>12s} {'top-1':>7s} {'ppl':>9s} {'ppl ref':>9s} {'ratio':>7s} {'MB':>8s}")
    for r in rows:
        print(f"{Path(r['model']).name[:40]:40s} {r['kl']:12.5f} {r['top1']:7.3f} {r['ppl_model']:9.3f} "
              f"{r['ppl_ref']:9.3f} {r['ppl_ratio']:7.3f} {r['bytes'] / 1e6:8.1f}")
    if plot:
        print(f"plot: {plot}")
    return 0
