"""One module per `edgeact` subcommand, each with add_parser(subparsers) and run(args) -> int.

COMMANDS holds each command's one-line help so `edgeact --help` can list them without
importing any command module (some pull in torch or onnx to declare their options)."""


def thread_count(text: str) -> int:
    """argparse type of --threads: a positive count, no more than the native runtime takes."""
    import argparse

    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of threads, not {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number of threads, not {n}")
    from edgeact.runtime import available

    if available():
        from edgeact.runtime._native import lib

        if n > lib.EA_MAX_THREADS:
            raise argparse.ArgumentTypeError(f"{n} is more than the native runtime runs (at most {lib.EA_MAX_THREADS})")
    return n


COMMANDS = {
    "convert": "convert a checkpoint (GGUF, HF folder, llama2.c .bin) to a model folder",
    "run": "generate text with a model folder (default: SmolLM2-135M-Instruct int4)",
    "eval": "KL divergence, top-1 agreement and perplexity against the fp32 source",
    "info": "architecture, dims, quantization, sparsity and size of a model folder",
    "bench": "prompt processing and generation speed, ours vs onnxruntime/llama.cpp/torch",
    "steer": "compute, inspect and measure steering vectors (llama.cpp control vectors)",
    "sweep": "activation sparsity: quality and decode speed over methods and targets",
    "serve": "an OpenAI-compatible HTTP server with per-request steering and JSON-schema output",
    "profile": "where a generated token's time goes, per op, next to the memory-bandwidth roofline",
}
