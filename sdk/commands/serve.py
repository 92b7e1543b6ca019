"""`edgeact serve MODEL_DIR`: an OpenAI-compatible HTTP server (docs/serving.md)."""
from __future__ import annotations

import argparse
import sys

from edgeact.commands import COMMANDS, thread_count


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help=COMMANDS["serve"], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Serve a model folder over the OpenAI API: /v1/chat/completions, /v1/completions "
                       "(streaming with SSE or not), /v1/models, /health, and per-request steering vectors "
                       "(/v1/steering/vectors). Each session keeps its KV cache, so the next request of a "
                       "conversation prefills only its new messages. Listens on 127.0.0.1 unless --host says "
                       "otherwise. Needs the serve extra: pip install \"edgeact[serve]\".")
    p.add_argument("model", nargs="?", default=None, help="model folder (default: SmolLM2-135M-Instruct int4)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (0: any free port, printed at start)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--sessions", type=int, default=2,
                   help="concurrent generations, each with its own KV cache (memory per session is printed)")
    p.add_argument("--queue", type=int, default=16,
                   help="requests that may wait for a session; beyond that the server answers 503 + Retry-After")
    p.add_argument("--vectors", metavar="DIR", default=None,
                   help="folder of control vectors (llama.cpp GGUF); requests name them by file stem")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the folder's name)")
    p.add_argument("--max-tokens", type=int, default=512, help="reply length when a request gives no max_tokens")
    p.add_argument("--max-body", type=int, default=4 << 20, help="largest request body in bytes")
    p.add_argument("--engine", choices=("auto", "native", "ort"), default="auto",
                   help="native C runtime, onnxruntime, or auto (native when built)")
    p.add_argument("--threads", type=thread_count, default=None, help="threads per session (default: physical cores)")
    p.add_argument("-c", "--ctx-size", type=int, default=None, metavar="N",
                   help="context per session in tokens (default: the model's, capped; less context, less memory)")


def run(args) -> int:
    import socket

    from edgeact.extras import require

    require("fastapi", "edgeact serve")
    uvicorn = require("uvicorn", "edgeact serve")
    import edgeact
    from edgeact.server import Server, create_app

    for name in ("sessions", "queue", "max_tokens", "max_body"):
        v = getattr(args, name)
        if v < (0 if name in ("queue", "max_tokens") else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, not {v}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in 0..65535, not {args.port}")
    model = edgeact.load(args.model, engine=args.engine, threads=args.threads, n_ctx=args.ctx_size)
    server = Server(model, args.model_name or model.folder.name, sessions=args.sessions, max_queue=args.queue,
                    api_key=args.api_key, max_body=args.max_body, vectors_dir=args.vectors,
                    default_max_tokens=args.max_tokens)
    app = create_app(server)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    sock.listen(2048)  # connections wait in the backlog while the sessions are made
    port = sock.getsockname()[1]
    vectors = f", {len(server.store.vectors)} steering vectors" if server.store.vectors else ""
    print(f"edgeact serve: {server.model_id} on http://{args.host}:{port}/v1 ({args.sessions} sessions, "
          f"context {server.n_ctx}{vectors}{', API key required' if args.api_key else ''})", file=sys.stderr,
          flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
