"""`edgeact bench`: speed side by side with onnxruntime, llama.cpp and torch, in one run."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgeact.commands import COMMANDS, thread_count


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help=COMMANDS["bench"],
                       description="llama-bench-style figures: prompt processing (pp) and token generation (tg) in "
                       "tokens/s, median ± stddev over repetitions, for each engine on the same weights in one run. "
                       "Each repetition of each engine is its own process (llama.cpp: its own llama-bench run), "
                       "started only when the previous one has exited, and the engines alternate round by round, "
                       "so no engine is timed beside another's threads and a drift of the machine hits all alike; "
                       "ratios are medians of per-repetition ratios. A run refuses to start when the load average "
                       "says another job is running (--allow-contended runs anyway and marks the table). "
                       "llama.cpp is llama.cpp's own llama-bench on a GGUF of the same weights once "
                       "--setup-llama-bench has built it (else the Python binding, labelled as such); generate "
                       "is Model.generate (sampling, repetition penalty, stop strings, streaming detokenization) "
                       "on the native engine, the user's path beside the raw step. Also the machine (CPU, kernel "
                       "set, clock, load), its memory read bandwidth (for sparse folders also the rate of the "
                       "scattered row reads input sparsity makes), decode weight GB/s as a share of it, and peak "
                       "RSS. --shape makes a random-weight model of a named shape (speed does not depend on weight "
                       "values). --kernels times the int4 matmul alone against onnxruntime's MatMulNBits.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("models", nargs="*", help="model folders")
    p.add_argument("--setup-llama-bench", action="store_true",
                   help="build llama.cpp's llama-bench and llama-quantize from the sources of the pinned "
                        "llama-cpp-python release (cmake from PyPI, native CPU flags, 2 jobs, about ten minutes), "
                        "cached under ~/.cache/edgeact, then exit")
    p.add_argument("--shape", action="append", default=[],
                   help="random-weight model of this shape (tiny, smollm2-135m, tinyllama-1.1b, llama-7b, gemma3-270m, "
                        "qwen3-0.6b, llama3.2-1b), cached")
    p.add_argument("--quant", default="int4", help="quantization for --shape models")
    p.add_argument("--group-size", type=int, default=32, help="group size for --shape models")
    p.add_argument("--engines", default="native,generate,ort,llama.cpp",
                   help="comma list of native, native-lowmem (the native runtime with low_memory: sparse folders "
                        "keep one weight copy, prefill runs the sparse kernel row by row), generate (Model.generate "
                        "on native), ort, llama.cpp (llama-bench), llama.cpp-py (llama-cpp-python's eval), torch")
    p.add_argument("-p", "--pp", type=int, default=128, help="prompt tokens")
    p.add_argument("-n", "--tg", type=int, default=64, help="generated tokens")
    p.add_argument("-r", "--reps", type=int, default=5, help="repetitions")
    p.add_argument("-t", "--threads", type=thread_count, default=None, help="threads (default: physical cores)")
    p.add_argument("--kernels", action="append", default=[], metavar="M,K,N",
                   help="time the int4 matmul for this shape instead of models (repeatable)")
    p.add_argument("--no-bandwidth", action="store_true", help="skip the memory bandwidth measurement")
    p.add_argument("--sequential", action="store_true",
                   help="each engine's repetitions back to back in one process (one load per engine instead of "
                        "one per repetition; ratios then come from separate stretches of time)")
    p.add_argument("--allow-contended", action="store_true",
                   help="run even when the load average at the start says another job is running; the report "
                        "is marked contended")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--trace", metavar="OUT.json", default=None,
                   help="after the timed runs, trace one native pp+tg run of the first model (Chrome/Perfetto JSON)")


def shape_path(shape: str, quant: str, group_size: int) -> Path:
    from edgeact.bench import CACHE
    from edgeact.default_model import CACHE_FORMAT

    return CACHE / f"random-{shape}-{quant}-g{group_size}-f{CACHE_FORMAT}"


def shape_folder(shape: str, quant: str, group_size: int) -> Path:
    from edgeact.converters.convert import convert
    from edgeact.converters.random_model import random_source

    out = shape_path(shape, quant, group_size)
    if not (out / "edgeact.json").exists():
        print(f"building random-weight {shape} ({quant} g{group_size}) in {out} (once)", file=sys.stderr)
        out.parent.mkdir(parents=True, exist_ok=True)
        convert(random_source(shape), out, quant=quant, group_size=group_size, overwrite=True)
    return out


def settle_after_build(timeout_s: float = 150.0) -> None:
    """The build just ran on these cores, so the one-minute load average still counts it: wait (up to
    timeout_s) for it to decay under the quiet threshold, else the guard would refuse the race for a
    load the race itself caused."""
    import os
    import time

    from edgeact.bench.probes import QUIET_LOAD

    t0 = time.monotonic()
    if os.getloadavg()[0] >= QUIET_LOAD:
        print(f"waiting for the load average to settle under {QUIET_LOAD} after the build ...", file=sys.stderr)
    while os.getloadavg()[0] >= QUIET_LOAD and time.monotonic() - t0 < timeout_s:
        time.sleep(2.0)


def run(args) -> int:
    from edgeact import bench

    log = (lambda *a, **k: None) if args.json else print
    if args.setup_llama_bench:
        from edgeact.bench import llamabench

        llamabench.setup(progress=print)
        return 0
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
    if args.reps < 1 or args.pp < 0 or args.tg < 0 or not (args.pp or args.tg):
        raise ValueError("-r must be at least 1, -p and -n at least 0 and not both 0")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in bench.ENGINES]
    if bad:
        raise ValueError(f"unknown engine {bad[0]!r}; choose from {', '.join(bench.ENGINES)}")
    built = [s for s in args.shape if not (shape_path(s, args.quant, args.group_size) / "edgeact.json").exists()]
    folders = [Path(m) for m in args.models] + [shape_folder(s, args.quant, args.group_size) for s in args.shape]
    if built and not args.allow_contended:
        settle_after_build()
    if not folders:
        raise ValueError("give model folders or --shape NAME (or --kernels M,K,N)")
    for f in folders:
        if not (f / "edgeact.json").exists():
            raise ValueError(f"{f} is not a model folder")
    rep = bench.bench_models(folders, engines=engines, threads=args.threads, pp=args.pp, tg=args.tg,
                             reps=args.reps, measure_bw=not args.no_bandwidth, interleave=not args.sequential,
                             allow_contended=args.allow_contended, progress=log)
    print(json.dumps(rep, indent=2) if args.json else bench.format_report(rep))
    if args.trace:
        from edgeact.trace import trace_pp_tg

        tracer = trace_pp_tg(folders[0], args.pp, args.tg, args.threads, args.trace)
        print(f"trace of {folders[0].name}: {len(tracer.steps)} forward calls in {args.trace}", file=sys.stderr)
    return 0
