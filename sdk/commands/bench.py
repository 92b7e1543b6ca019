"""`edgeact bench`: speed side by side with onnxruntime, llama.cpp and torch, in one run."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgeact.commands import COMMANDS


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help=COMMANDS["bench"],
                       description="llama-bench-style figures: prompt processing (pp) and token generation (tg) in "
                       "tokens/s, median ± stddev over repetitions, for each engine on the same weights in one run "
                       "(each engine in its own process, all loaded at once and taking their repetitions in turn, so that "
                       "a drift of the machine hits them alike; ratios are medians of per-repetition ratios; "
                       "--sequential runs one engine at a time instead, for devices short of memory). "
                       "Also the machine's memory read bandwidth (for sparse folders also the rate of the scattered "
                       "row reads input sparsity makes, which on some CPUs is half the sequential one), decode weight "
                       "GB/s as a share of it, and peak RSS. --shape makes a random-weight model of a named shape "
                       "(speed does not depend on weight values). --kernels times the int4 matmul alone against "
                       "onnxruntime's MatMulNBits.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("models", nargs="*", help="model folders")
    p.add_argument("--shape", action="append", default=[],
                   help="random-weight model of this shape (tiny, smollm2-135m, tinyllama-1.1b, llama-7b), cached")
    p.add_argument("--quant", default="int4", help="quantization for --shape models")
    p.add_argument("--group-size", type=int, default=32, help="group size for --shape models")
    p.add_argument("--engines", default="native,ort,llama.cpp",
                   help="comma list of native, native-lowmem (the native runtime with low_memory: sparse folders "
                        "keep one weight copy, prefill runs the sparse kernel row by row), ort, llama.cpp, torch")
    p.add_argument("-p", "--pp", type=int, default=128, help="prompt tokens")
    p.add_argument("-n", "--tg", type=int, default=64, help="generated tokens")
    p.add_argument("-r", "--reps", type=int, default=5, help="repetitions")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: physical cores)")
    p.add_argument("--kernels", action="append", default=[], metavar="M,K,N",
                   help="time the int4 matmul for this shape instead of models (repeatable)")
    p.add_argument("--no-bandwidth", action="store_true", help="skip the memory bandwidth measurement")
    p.add_argument("--sequential", action="store_true",
                   help="one engine loaded at a time, its repetitions back to back (less memory at once; "
                        "ratios then come from separate stretches of time)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def shape_folder(shape: str, quant: str, group_size: int) -> Path:
    from edgeact.bench import CACHE
    from edgeact.default_model import CACHE_FORMAT
    from edgeact.converters.convert import convert
    from edgeact.converters.random_model import random_source

    out = CACHE / f"random-{shape}-{quant}-g{group_size}-f{CACHE_FORMAT}"
    if not (out / "edgeact.json").exists():
        print(f"building random-weight {shape} ({quant} g{group_size}) in {out} (once)")
        out.parent.mkdir(parents=True, exist_ok=True)
        convert(random_source(shape), out, quant=quant, group_size=group_size, overwrite=True)
    return out


def run(args) -> int:
    from edgeact import bench

    log = (lambda *a, **k: None) if args.json else print
    if args.kernels:
        shapes = []
        for spec in args.kernels:
            try:
                m, k, n = (int(v) for v in spec.split(","))
            except ValueError:
                raise ValueError(f"--kernels takes M,K,N (e.g. 1,4096,4096), not {spec!r}") from None
            if min(m, k, n) < 1:
                raise ValueError(f"--kernels dims must be positive: {spec}")
            shapes.append((m, k, n))
        rep = bench.bench_kernels(shapes, threads=args.threads, reps=args.reps, measure_bw=not args.no_bandwidth,
                                  progress=log)
        print(json.dumps(rep, indent=2) if args.json else bench.format_kernels(rep))
        return 0
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in bench.ENGINES]
    if bad:
        raise ValueError(f"unknown engine {bad[0]!r}; choose from {', '.join(bench.ENGINES)}")
    folders = [Path(m) for m in args.models] + [shape_folder(s, args.quant, args.group_size) for s in args.shape]
    if not folders:
        raise ValueError("give model folders or --shape NAME (or --kernels M,K,N)")
    for f in folders:
        if not (f / "edgeact.json").exists():
            raise ValueError(f"{f} is not a model folder")
    rep = bench.bench_models(folders, engines=engines, threads=args.threads, pp=args.pp, tg=args.tg,
                             reps=args.reps, measure_bw=not args.no_bandwidth, interleave=not args.sequential,
                             progress=log)
    print(json.dumps(rep, indent=2) if args.json else bench.format_report(rep))
    return 0
