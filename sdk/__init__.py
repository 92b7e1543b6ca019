"""edgeact: convert small language models to 4-bit, activation-sparse ONNX folders and run them on the edge.

    import edgeact
    m = edgeact.load("smollm2-int4/")          # engine="auto": native runtime, else onnxruntime
    print(m.chat("Write a haiku about rain.").text)
"""
from edgeact.contract import VERSION as __version__  # the one version (edgeact/contract)


def load(path=None, engine: str = "auto", threads=None, low_memory: bool = False):
    """See edgeact.api.load (imported lazily: `import edgeact` stays light)."""
    from edgeact.api import load as _load

    return _load(path, engine=engine, threads=threads, low_memory=low_memory)


__all__ = ["load", "__version__"]
