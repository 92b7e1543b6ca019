"""Per-op profile of one prompt pass on the native runtime (default: 128 tokens on the
TinyLlama-1.1B shape, int4 g32, 2 threads): the table behind docs/performance.md's prefill
section. Run it on a quiet machine; the best of --reps passes is printed.

    python tools/profile_prefill.py [--shape tinyllama-1.1b] [--pp 128] [--threads 2] [--reps 5]
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tinyllama-1.1b")
    ap.add_argument("--folder", default=None, help="a model folder instead of a random-weight shape")
    ap.add_argument("--pp", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-chunk", type=int, default=0, help="prompt rows per pass (0: the runtime's default)")
    args = ap.parse_args()

    from edgeact.commands.bench import shape_folder
    from edgeact.engines import make_engine
    from edgeact.runtime import format_profile

    folder = args.folder or shape_folder(args.shape, "int4", 32)
    eng = make_engine(folder, "native", threads=args.threads, n_ctx=args.pp + 8, max_chunk=args.max_chunk or None)
    ids = np.random.default_rng(0).integers(3, eng.vocab_size, size=args.pp, dtype=np.int64)
    eng.forward(ids[:16], logits="last")
    best = None
    for _ in range(args.reps):
        eng.reset()
        eng.profile(True)
        eng.profile_reset()
        t0 = time.perf_counter()
        eng.forward(ids, logits="last")
        wall = time.perf_counter() - t0
        recs = eng.profile_records()
        eng.profile(False)
        if best is None or wall < best[0]:
            best = (wall, recs)
    wall, recs = best
    print(f"{folder}: pp{args.pp} {args.pp / wall:.1f} t/s ({wall * 1e3:.0f} ms), kernels {eng.isa}, "
          f"{args.threads} threads, best of {args.reps}")
    print(format_profile(recs))
    agg: dict[str, list[float]] = {}
    for r in recs:
        if r["op_type"] == "MatMulNBits":
            a = agg.setdefault(r["name"].rsplit(".", 1)[-1], [0, 0, 0])
            a[0] += r["ns"]
            a[1] += r["weight_bytes"]
            a[2] += r["calls"]
    print(f"\n{'matmul':<14}{'ms':>10}{'MB':>9}{'calls':>7}")
    for k, (ns, wb, calls) in sorted(agg.items(), key=lambda kv: -kv[1][0]):
        print(f"{k:<14}{ns / 1e6:>10.1f}{wb / 1e6:>9.1f}{calls:>7}")


if __name__ == "__main__":
    main()
