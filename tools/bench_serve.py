"""Benchmarks for sessions, the server and JSON-schema output (run on a quiet machine).

  python tools/bench_serve.py turns  MODEL_DIR   # time to first token per chat turn: cached session vs re-prefill
  python tools/bench_serve.py server MODEL_DIR   # decode tokens/s: streaming /v1/chat/completions vs generate,
                                                 # then N concurrent clients (total throughput)
  python tools/bench_serve.py json   MODEL_DIR   # decode time per token with and without a JSON schema

Each prints a table and, with --json OUT, writes the numbers. MODEL_DIR defaults to the default
model (SmolLM2-135M-Instruct int4). Goals: turn-2 TTFT >= 5x faster than re-prefilling; streaming
within 10% of generate; JSON-schema overhead <= 15% per token.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time

USER_TURNS = [
    "Hi! Can you tell me a little about the history of lighthouses?",
    "Interesting. How did lighthouse keepers live, day to day?",
    "What replaced the keepers once lighthouses were automated?",
    "Are there any famous lighthouses I could visit in Europe?",
    "Thanks! Could you summarise our conversation in two sentences?",
]


def _load(args):
    import edgeact

    return edgeact.load(args.model, threads=args.threads, n_ctx=args.ctx_size)


def bench_turns(args) -> dict:
    """Per turn: TTFT of the session (prefix from the cache) and of a fresh model (whole conversation)."""
    model = _load(args)
    session = model.session()
    messages, rows, base = [], [], 0
    for turn, text in enumerate(USER_TURNS, 1):
        messages.append({"role": "user", "content": text})
        ids = model.chat_ids(messages)
        fresh, cached = [], []
        for _ in range(args.reps):
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=1)
            fresh.append(time.perf_counter() - t)
        for _ in range(args.reps):
            session.truncate(base)  # each repetition is the turn's first visit: the cache ends at the last reply
            t = time.perf_counter()
            session.generate(ids, max_new_tokens=1)
            cached.append(time.perf_counter() - t)
        reused = session.last["cached_tokens"]
        reply = session.generate(ids, max_new_tokens=args.reply_tokens)
        messages.append({"role": "assistant", "content": reply.text})
        base = len(session.ids)
        f, c = statistics.median(fresh), statistics.median(cached)
        rows.append({"turn": turn, "prompt_tokens": len(ids), "cached_tokens": reused, "ttft_fresh_ms": f * 1e3,
                     "ttft_session_ms": c * 1e3, "speedup": f / c})
    print(f"{'turn':>4}{'prompt':>8}{'cached':>8}{'fresh ms':>10}{'session ms':>12}{'speedup':>9}")
    for r in rows:
        print(f"{r['turn']:>4}{r['prompt_tokens']:>8}{r['cached_tokens']:>8}{r['ttft_fresh_ms']:>10.1f}"
              f"{r['ttft_session_ms']:>12.1f}{r['speedup']:>8.1f}x")
    return {"turns": rows}


def _serve(args):
    cmd = [sys.executable, "-c", "import sys; from edgeact.cli import main; sys.exit(main())", "serve",
           "--port", "0", "--sessions", str(args.clients), "--queue", "64"]
    if args.model:
        cmd.insert(4, args.model)
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.ctx_size:
        cmd += ["--ctx-size", str(args.ctx_size)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    if "http://" not in line:
        proc.kill()
        raise SystemExit(f"edgeact serve did not start: {line}{proc.stderr.read()}")
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    return proc, "http://" + line.split("http://")[1].split("/v1")[0] + "/v1"


def bench_server(args) -> dict:
    """Decode tokens/s through streaming chat (one client, then N at once) against Session.generate."""
    import openai

    model = _load(args)
    messages = [{"role": "user", "content": USER_TURNS[0]}]
    n = args.tokens
    session = model.session()
    direct = []
    for _ in range(args.reps):
        session.reset()
        r = session.generate(model.chat_ids(messages), max_new_tokens=n, ignore_eos=True)
        direct.append((len(r.ids) - 1) / r.decode_s)
    proc, url = _serve(args)
    try:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        model_id = client.models.list().data[0].id

        def one(out: list):
            """(tokens, seconds from the first text to the last): decode speed as a client sees it."""
            t_first = t_last = None
            count = 0
            for chunk in client.chat.completions.create(model=model_id, messages=messages, max_tokens=n,
                                                        temperature=0, stream=True,
                                                        stream_options={"include_usage": True},
                                                        extra_body={"ignore_eos": True}):
                if chunk.choices and chunk.choices[0].delta.content:
                    t_last = time.perf_counter()
                    t_first = t_first or t_last
                if chunk.usage is not None:
                    count = chunk.usage.completion_tokens
            out.append((count, t_last - t_first))

        served = []
        for _ in range(args.reps):
            res: list = []
            one(res)
            count, dt = res[0]
            served.append((count - 1) / dt)
        res = []
        threads = [threading.Thread(target=one, args=(res,)) for _ in range(args.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(10)
    d, s = statistics.median(direct), statistics.median(served)
    total = sum(c for c, _ in res) / wall
    print(f"generate {d:.1f} tok/s, streaming server {s:.1f} tok/s ({100 * (s / d - 1):+.1f}%); "
          f"{args.clients} concurrent clients: {len(res)} completed, {total:.1f} tok/s total")
    return {"generate_tok_s": d, "server_stream_tok_s": s, "ratio": s / d, "clients": args.clients,
            "completed": len(res), "concurrent_total_tok_s": total}


SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string"}, "year": {"type": "integer"},
    "chapters": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "summary": {"type": "string"}}, "required": ["name", "summary"],
        "additionalProperties": False}, "minItems": 3}},
    "required": ["title", "year", "chapters"], "additionalProperties": False}


def bench_json(args) -> dict:
    """Decode ms per token with the schema's mask against plain decoding of the same length."""
    from edgeact.grammar import JsonSchemaConstraint, _ll_tokenizer

    model = _load(args)
    ids = model.chat_ids("Describe a book you like as JSON with its title, year and chapters.")
    _ll_tokenizer(model)  # once per model, not per request
    t = time.perf_counter()
    JsonSchemaConstraint(model, SCHEMA)
    compile_ms = (time.perf_counter() - t) * 1e3
    with_schema, plain, mask_us = [], [], []
    for _ in range(args.reps):
        r = model.generate(ids, max_new_tokens=args.tokens, json_schema=SCHEMA)
        n = len(r.ids)
        with_schema.append(r.decode_s / (n - 1))
        p = model.session().generate(ids, max_new_tokens=n, ignore_eos=True)
        plain.append(p.decode_s / (len(p.ids) - 1))
        c = JsonSchemaConstraint(model, SCHEMA)
        for tok in r.ids[:-1]:
            t = time.perf_counter()
            c.allowed()
            mask_us.append((time.perf_counter() - t) * 1e6)
            c.accept(tok)
    a, b = statistics.median(with_schema), statistics.median(plain)
    print(f"schema compile {compile_ms:.1f} ms; decode {b * 1e3:.2f} ms/token plain, {a * 1e3:.2f} with the schema "
          f"({100 * (a / b - 1):+.1f}%); mask alone {statistics.median(mask_us):.0f} us/token (median)")
    return {"compile_ms": compile_ms, "plain_ms_per_token": b * 1e3, "schema_ms_per_token": a * 1e3,
            "overhead": a / b - 1, "mask_us_median": statistics.median(mask_us)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("turns", "server", "json"))
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("-c", "--ctx-size", type=int, default=2048)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tokens", type=int, default=128, help="tokens per reply (server, json)")
    p.add_argument("--reply-tokens", type=int, default=64, help="assistant reply length between turns")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--json", dest="out", default=None, help="write the numbers here")
    args = p.parse_args(argv)
    out = {"turns": bench_turns, "server": bench_server, "json": bench_json}[args.what](args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
