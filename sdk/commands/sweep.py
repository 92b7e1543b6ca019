"""`edgeact sweep SRC`: the activation-sparsity quality/speed curve."""
from __future__ import annotations

import argparse
import json

from edgeact.commands import COMMANDS


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help=COMMANDS["sweep"],
                       description="Convert SRC at each sparsity method × target (plus dense), measure KL, top-1 "
                       "and perplexity against the fp32 source on held-out sampled text, realized sparsity, and "
                       "native decode tokens/s with its speed-up over dense int4; print one table, save a plot.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("source", help="checkpoint (GGUF, HF folder, llama2.c .bin), or random:SHAPE for speed work")
    p.add_argument("-o", "--output", required=True, help="folder for the converted variants")
    p.add_argument("--methods", default="teal,chess,wina,cats",
                   help="comma-separated sparsity methods: teal, chess, wina, cats, coreinfer")
    p.add_argument("--sparsities", default="0.25,0.4,0.5,0.7", help="comma-separated targets in [0, 1)")
    p.add_argument("--group-size", type=int, default=32, help="int4 quantization block along K (32, 64, 128)")
    p.add_argument("--no-quality", action="store_true", help="speed only (random-weight shapes)")
    p.add_argument("--no-speed", action="store_true", help="quality only")
    p.add_argument("--sequential", action="store_true",
                   help="time one variant at a time (less memory; by default all are loaded and timed in turn)")
    p.add_argument("--tokens", type=int, default=256, help="evaluation tokens")
    p.add_argument("--png", default=None, help="save the quality-vs-speed-up plot here")
    p.add_argument("--json", action="store_true", help="print the rows as JSON (and no progress bars)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    from edgeact.commands.convert import SPARSITY_METHODS

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ValueError("--methods names no method; choose from " + ", ".join(SPARSITY_METHODS))
    for m in methods:
        if m not in SPARSITY_METHODS:
            raise ValueError(f"unknown sparsity method {m!r}; choose from {', '.join(SPARSITY_METHODS)}")
    try:
        sparsities = [float(s) for s in args.sparsities.split(",")]
    except ValueError:
        raise ValueError(f"--sparsities takes comma-separated numbers, not {args.sparsities!r}") from None
    for s in sparsities:
        if not 0.0 <= s < 1.0:
            raise ValueError(f"--sparsities: {s:g} is outside [0, 1)")
    if args.no_quality and args.no_speed:
        raise ValueError("--no-quality with --no-speed leaves nothing to measure")
    if args.png and args.no_quality:
        raise ValueError("--png plots quality against speed: it needs the quality measurements (drop --no-quality)")
    if args.tokens < 2:
        raise ValueError(f"--tokens must be at least 2, not {args.tokens}")
    from edgeact.converters.convert import validate_options

    validate_options("int4", args.group_size, None, None)
    from edgeact.sweep import format_table, plot, sweep

    source = args.source
    if source.startswith("random:"):
        from edgeact.converters.random_model import random_source

        source = random_source(source.split(":", 1)[1])
    rows = sweep(source, methods, sparsities, args.output, group_size=args.group_size,
                 quality=not args.no_quality, speed=not args.no_speed, n_tokens=args.tokens,
                 interleave=not args.sequential, progress=(lambda *a: None) if args.json else print,
                 bars=not (args.json or args.quiet))
    if args.png:
        plot(rows, args.png)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0
