"""`edgeact profile MODEL_DIR`: where a generated token's time goes, per op, against the roofline."""
from __future__ import annotations

import argparse
import sys

from edgeact.commands import COMMANDS, thread_count


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help=COMMANDS["profile"], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Generate with the native runtime's profiler on, print the per-op-type table of a "
                       "decode token (ms, share, weight bytes per second and the share of the machine's read "
                       "bandwidth that reaches) and save it as a PNG bar chart. Decode reads every weight once per "
                       "token, so a matmul near 100% of the roofline cannot get faster without reading fewer bytes.")
    p.add_argument("model", nargs="?", default=None, help="model folder (default: SmolLM2-135M-Instruct int4)")
    p.add_argument("-p", "--prompt", default="Write a short story about a lighthouse keeper.",
                   help="prompt (as a user turn when the model has a chat template; token ids such as '1,42,7' "
                        "for a folder without a tokenizer)")
    p.add_argument("-n", "--tokens", type=int, default=32, help="tokens to generate (the table averages them)")
    p.add_argument("--threads", type=thread_count, default=None, help="threads (default: one per physical core)")
    p.add_argument("-o", "--output", default="profile.png", help="the chart (PNG)")
    p.add_argument("--trace", metavar="OUT.json", default=None, help="also write the Chrome/Perfetto trace")
    p.add_argument("--bandwidth", type=float, default=None, metavar="GB/s",
                   help="the machine's read bandwidth (default: measured now over 256 MiB with the same threads)")


def run(args) -> int:
    import edgeact
    from edgeact.trace import Tracer, format_summary, op_summary, plot_summary

    if args.tokens < 2:
        raise ValueError(f"--tokens must be at least 2 (one prefill and one decode step), not {args.tokens}")
    if args.bandwidth is not None and not args.bandwidth > 0:
        raise ValueError(f"--bandwidth must be a positive number of GB/s, not {args.bandwidth}")
    model = edgeact.load(args.model, engine="native", threads=args.threads)
    prompt = args.prompt
    if model.tokenizer is None:
        try:
            prompt = [int(t) for t in prompt.replace(",", " ").split()]
        except ValueError:
            raise ValueError(f"{model.folder} has no tokenizer: give the prompt as token ids, e.g. -p '1,42,7'") \
                from None
    elif model.tokenizer.chat_template:
        prompt = model.chat_ids(prompt)
    tracer = Tracer(model)
    with tracer.recording():
        res = model.generate(prompt, max_new_tokens=args.tokens)
    if not any(s["kind"] == "decode" for s in tracer.steps):
        raise ValueError("the model ended its reply after one token: try another --prompt")
    bw = args.bandwidth
    if bw is None:
        from edgeact.runtime.session import measure_read_bandwidth

        bw = measure_read_bandwidth(threads=model.engine.threads, nbytes=256 << 20, reps=3)
    rows = op_summary(tracer.steps, bw)
    eng = model.engine
    print(f"{model.folder.name}: {eng.isa}, {eng.threads} threads, {len(res.ids)} tokens generated, "
          f"read bandwidth {bw:.1f} GB/s")
    print(format_summary(rows))
    title = f"{model.folder.name} · {eng.isa} · {eng.threads} threads · decode"
    from edgeact.extras import first_missing, install_hint

    if first_missing(["matplotlib"]):  # the device install: the table above is the whole result
        print(f"edgeact: no chart without matplotlib ({install_hint('matplotlib')})", file=sys.stderr)
    else:
        print(f"chart: {plot_summary(rows, args.output, title, bw)}", file=sys.stderr)
    if args.trace:
        print(f"trace: {tracer.save(args.trace)}", file=sys.stderr)
    return 0
