"""`edgeact steer`: compute steering vectors, inspect control-vector files, measure a vector's effect.

    edgeact steer compute SRC_OR_MODEL --pos POS.txt --neg NEG.txt -o VEC.gguf
                          [--method mean-diff|pca] [--layers A-B] [--position last|mean] [--chat]
    edgeact steer info VEC.gguf
    edgeact steer sweep MODEL VEC.gguf --prompts P.txt --pos-words W+.txt --neg-words W-.txt
                        [--scales=-4,0,4] [--layers A-B] [--ablate] [--engine auto|native|ort]
"""
from __future__ import annotations

import json

from edgeact.commands import COMMANDS
from edgeact.control_vector import control_vector_info, save_control_vector
from edgeact.steering import (METHODS, POSITIONS, compute_vectors, hidden_source, iter_prompts, parse_layers,
                              word_logprob_shift)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("steer", help=COMMANDS["steer"])
    sub = p.add_subparsers(dest="steer_command", required=True)

    c = sub.add_parser("compute", help="a control vector from positive vs negative prompts")
    c.add_argument("model", help="model folder (edgeact convert output) or source checkpoint (GGUF, HF folder, .bin)")
    c.add_argument("--pos", required=True, help="positive prompts, one per line")
    c.add_argument("--neg", required=True, help="negative prompts, one per line")
    c.add_argument("-o", "--output", required=True, help="output control vector (.gguf, llama.cpp format)")
    c.add_argument("--method", choices=METHODS, default="mean-diff",
                   help="difference of the two sides' mean hidden states, or the first principal component "
                        "of the paired differences")
    c.add_argument("--layers", default=None, metavar="A-B",
                   help="0-based layers to compute (default 1..last: llama.cpp cannot hold layer 0)")
    c.add_argument("--position", choices=POSITIONS, default="last",
                   help="hidden state of the last prompt token, or the mean over the prompt")
    c.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn in the chat template")
    c.add_argument("--engine", choices=("auto", "native", "ort"), default="auto", help="engine for a model folder")

    i = sub.add_parser("info", help="metadata and per-layer norms of a control vector")
    i.add_argument("vector", help="control vector (.gguf, llama.cpp format)")
    i.add_argument("--json", action="store_true", help="print JSON")

    s = sub.add_parser("sweep", help="next-token log-probability shift of two word lists at several scales")
    s.add_argument("model", help="model folder")
    s.add_argument("vector", help="control vector (.gguf)")
    s.add_argument("--prompts", required=True, help="held-out prompts, one per line")
    s.add_argument("--pos-words", required=True, help="words of the positive side, one per line")
    s.add_argument("--neg-words", required=True, help="words of the negative side, one per line")
    s.add_argument("--scales", default="-4,-2,0,2,4,8", help="comma-separated scales; write --scales=-4,0,4 when the first is negative")
    s.add_argument("--layers", default=None, metavar="A-B", help="only these layers of the vector")
    s.add_argument("--ablate", action="store_true", help="also measure with the direction projected out")
    s.add_argument("--no-chat", action="store_true", help="do not wrap prompts in the chat template")
    s.add_argument("--engine", choices=("auto", "native", "ort"), default="auto",
                   help="native C runtime, onnxruntime, or auto (native when built)")


def run(args) -> int:
    return {"compute": _compute, "info": _info, "sweep": _sweep}[args.steer_command](args)


def _compute(args) -> int:
    from pathlib import Path

    if not Path(args.output).parent.is_dir():   # before minutes of computing
        raise ValueError(f"cannot write {args.output}: folder {Path(args.output).parent} does not exist")
    source = _source(args.model, args.engine)
    layers = args.layers if args.layers is not None else list(range(1, source.num_layers))
    vectors = compute_vectors(source, iter_prompts(args.pos), iter_prompts(args.neg), layers=layers,
                              method=args.method, position=args.position, chat=args.chat)
    path = save_control_vector(args.output, vectors, model_hint=source.arch)
    print(f"wrote {path}: {len(vectors)} layers ({min(vectors)}..{max(vectors)}), n_embd {source.hidden_size}, "
          f"method {args.method}, position {args.position}")
    return 0


def _info(args) -> int:
    info = control_vector_info(args.vector)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"{info['path']}: {info['architecture']} for {info['model_hint']!r}, n_embd {info['n_embd']}, "
          f"{len(info['layers'])} layers (layer_count {info['layer_count']})")
    print("direction.N is added to the output of block N (0-based), as in llama.cpp")
    for layer, norm in info["norms"].items():
        print(f"  layer {layer:3d}  |v| = {norm:.4g}")
    return 0


def _sweep(args) -> int:
    import edgeact

    model = edgeact.load(args.model, engine=args.engine)
    prompts, pos, neg = iter_prompts(args.prompts), iter_prompts(args.pos_words), iter_prompts(args.neg_words)
    try:
        scales = [float(x) for x in args.scales.split(",")]
    except ValueError:
        raise ValueError(f"--scales must be comma-separated numbers, got {args.scales!r}") from None
    layers = parse_layers(args.layers, model.config.num_layers)
    chat = not args.no_chat
    print("scale   logp(pos) - logp(neg)")
    for scale in scales:
        with model.steering(args.vector, scale=scale, layers=layers):
            print(f"{scale:6g}  {word_logprob_shift(model, prompts, pos, neg, chat=chat):+.3f}")
    if args.ablate:
        with model.steering(args.vector, mode="ablate", layers=layers):
            print(f"ablate  {word_logprob_shift(model, prompts, pos, neg, chat=chat):+.3f}")
    return 0


def _source(path, engine):
    from pathlib import Path

    p = Path(path)
    if (p / "edgeact.json").is_file():
        import edgeact

        return hidden_source(edgeact.load(p, engine=engine))
    return hidden_source(p)
