"""`edgeact eval MODEL_DIR --ref SRC`: quality against the fp32 source on the same tokens."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgeact.commands import COMMANDS


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help=COMMANDS["eval"],
                       description="Compare converted model folders with their fp32 source on the same tokens: mean "
                       "KL(ref‖model) of next-token distributions (nats/token), top-1 agreement, perplexity of both. "
                       "Tokens come from --text, or are sampled from the fp32 reference with a fixed seed.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("models", nargs="+", help="model folder(s) converted from the same source")
    p.add_argument("--ref", required=True, help="the source checkpoint (GGUF, HF folder, llama2.c .bin)")
    p.add_argument("--text", default=None, help="evaluation text file (default: text sampled from the reference)")
    p.add_argument("--tokens", type=int, default=256, help="number of tokens evaluated")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled text")
    p.add_argument("--engine", choices=("ort", "native", "auto"), default="ort",
                   help="engine that runs the model folders (onnxruntime: the reference)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args) -> int:
    from edgeact.evaluate import Reference

    text = Path(args.text).read_text() if args.text else None
    ref = Reference(args.ref, text=text, n_tokens=args.tokens, seed=args.seed)
    rows = []
    for folder in args.models:
        q = ref.compare(folder, engine=args.engine)
        meta = json.loads((Path(folder) / "edgeact.json").read_text())
        rows.append({"model": folder, "quantization": meta.get("quantization"), "sparsity": meta.get("sparsity"),
                     **q.to_dict()})
    if args.json:
        print(json.dumps({"reference": args.ref, "engine": args.engine,
                          "tokens": "text" if text else f"sampled (seed {args.seed})", "results": rows}, indent=2))
        return 0
    print(f"reference: {args.ref}   tokens: {rows[0]['n_tokens']} ({'text' if text else 'sampled'})   engine: {args.engine}")
    print(f"{'model':40s} {'KL nats/tok':>12s} {'top-1':>7s} {'ppl':>9s} {'ppl ref':>9s} {'ratio':>7s}")
    for r in rows:
        print(f"{Path(r['model']).name[:40]:40s} {r['kl']:12.5f} {r['top1']:7.3f} {r['ppl_model']:9.3f} "
              f"{r['ppl_ref']:9.3f} {r['ppl_ratio']:7.3f}")
    return 0
