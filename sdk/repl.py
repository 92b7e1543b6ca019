"""The interactive chat of `edgeact run --chat`: a Session whose cache carries the conversation,
so each turn prefills only the new message. Ctrl-C stops a reply, not the program."""
from __future__ import annotations

import sys

HELP = """commands:
  /reset              forget the conversation (and the cache)
  /steer FILE[:SCALE] add a control vector (GGUF) to every later reply; /steer off removes all
  /stats              the last reply's cache reuse and speed, and the session's memory
  /help               this text
  /quit               leave (or Ctrl-D)"""


def chat_loop(model, gen: dict, steer_layers=None, system: str | None = None, setup=None,
              input_fn=input, out=sys.stdout) -> int:
    """Read user lines from input_fn until EOF or /quit; stream each reply to `out`.
    setup(session) runs once first (e.g. the command line's --steer options)."""
    from edgeact.steering import parse_steer_spec

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    session = model.session()
    if setup is not None:
        setup(session)
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    last = None
    out.write("edgeact chat: /help for commands, Ctrl-C stops a reply, Ctrl-D leaves\n")
    while True:
        try:
            line = input_fn("> ")
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\n")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            arg = arg.strip()
            if cmd in ("/quit", "/exit"):
                return 0
            if cmd == "/help":
                out.write(HELP + "\n")
            elif cmd == "/reset":
                messages = messages[:1] if system else []
                session.reset()
                out.write("(conversation cleared)\n")
            elif cmd == "/steer":
                if arg == "off":
                    session.clear_steering()
                    out.write("(steering off)\n")
                elif not arg:
                    out.write("usage: /steer FILE[:SCALE] or /steer off\n")
                else:
                    path, scale = parse_steer_spec(arg)
                    try:
                        session.steer(path, scale=scale, layers=steer_layers)
                    except (ValueError, OSError) as e:
                        out.write(f"error: {e}\n")
                    else:
                        out.write(f"(steering with {path} x {scale:g})\n")
            elif cmd == "/stats":
                out.write(stats_line(session, last) + "\n")
            else:
                out.write(f"unknown command {cmd}; /help lists them\n")
            out.flush()
            continue
        messages.append({"role": "user", "content": text})
        result: dict = {}
        pieces: list[str] = []
        try:
            from edgeact.generation import GenerationConfig

            cfg = GenerationConfig(**gen)
            for piece in session._stream(model.chat_ids(messages), cfg, result):
                pieces.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [stopped]")
            result.setdefault("finish_reason", "interrupted")
        except ValueError as e:  # e.g. the conversation no longer fits the context
            out.write(f"\nerror: {e}\n")
            messages.pop()
            continue
        out.write("\n")
        messages.append({"role": "assistant", "content": "".join(pieces)})
        last = dict(result, **session.last)
    return 0


def stats_line(session, last) -> str:
    mem = f"session memory {session.memory_bytes / 2**20:.1f} MiB, {len(session.ids)} tokens cached"
    if not last or "prefill_s" not in last:
        return mem
    n = len(last.get("ids", []))
    speed = (n - 1) / last["decode_s"] if last.get("decode_s") and n > 1 else float("nan")
    return (f"last reply: {last['cached_tokens']} prompt tokens from the cache, {last['prefilled_tokens']} "
            f"prefilled in {last['prefill_s'] * 1e3:.0f} ms, {n} generated at {speed:.1f} tokens/s "
            f"({last.get('finish_reason')}); {mem}")
