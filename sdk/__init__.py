"""edgeact: convert small language models to 4-bit, activation-sparse ONNX folders and run them on the edge.

    import edgeact
    m = edgeact.load("smollm2-int4/")          # engine="auto": native runtime, else onnxruntime
    print(m.chat("Write a haiku about rain.").text)
"""
from edgeact.contract import VERSION as __version__  # the one version (edgeact/contract)

# The context a model gets when load() is not told otherwise: the model's own, at most this many
# tokens. The native engine reserves the KV cache (fp32 K and V of every layer) for the whole context
# when it loads, 46 KB per token for SmolLM2-135M: 190 MB at 4096, 380 MB at the model's 8192, which a
# phone may never use. onnxruntime grows its cache as tokens come but is held to the same limit, so
# both engines stop at the same point. Longer: load(..., n_ctx=8192) or `edgeact run --ctx-size 8192`.
DEFAULT_N_CTX = 4096


class ContextSizeError(ValueError):
    """n_ctx asks for more context than the model has."""

    def __init__(self, n_ctx: int, max_context: int):
        super().__init__(f"n_ctx={n_ctx} is more than this model's context ({max_context} tokens)")
        self.n_ctx, self.max_context = n_ctx, max_context


def load(path=None, engine: str = "auto", threads=None, low_memory: bool = False, n_ctx=None):
    """See edgeact.api.load (imported lazily: `import edgeact` stays light)."""
    from edgeact.api import load as _load

    return _load(path, engine=engine, threads=threads, low_memory=low_memory, n_ctx=n_ctx)


__all__ = ["load", "ContextSizeError", "DEFAULT_N_CTX", "__version__"]
