"""Does a model folder load and run in the engines of this install?

`edgeact convert` (and `sweep`) pass `verify_folder` to the converter, which calls it on the
finished folder before renaming it into place: a folder that an engine refuses is never left
behind. Each engine here is the real one (the native planner and a session; an onnxruntime
session, whose shape inference knows the contrib ops), and each runs one token, so a graph that
loads but cannot execute fails too.
"""
from __future__ import annotations

import numpy as np


def available_engines() -> list[str]:
    """The engines this install can run: native when built, ort when onnxruntime is installed."""
    import importlib.util

    from edgeact.engines import native_available

    out = ["native"] if native_available() else []
    if importlib.util.find_spec("onnxruntime") is not None:
        out.append("ort")
    return out


def verify_folder(folder, engines=None) -> list[str]:
    """Load `folder` in each engine (default: every available one), run one token, check the logits.

    Returns the engines checked; raises ValueError naming the engine that failed.
    """
    from edgeact.engines.base import read_meta

    meta = read_meta(folder)
    vocab = meta["config"]["vocab_size"]
    token = meta["config"].get("bos_token_id")
    ids = np.array([token if token is not None and 0 <= token < vocab else 0], np.int64)
    checked = []
    for name in available_engines() if engines is None else engines:
        try:
            logits = _one_token(folder, name, ids)
        except Exception as e:  # noqa: BLE001 - any failure is the engine refusing the folder
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{'native runtime' if name == 'native' else 'onnxruntime'}: {msg}") from e
        logits = np.asarray(logits)
        if logits.shape[-1] != vocab or not np.all(np.isfinite(logits)):
            raise ValueError(f"{name}: one token gave logits of shape {logits.shape} "
                             f"{'with NaN or Inf' if logits.shape[-1] == vocab else f'(vocab {vocab})'}")
        checked.append(name)
    return checked


def _one_token(folder, engine: str, ids):
    if engine == "native":
        from edgeact.engines.native_engine import NativeEngine

        eng = NativeEngine(folder, threads=1, n_ctx=8)
    elif engine == "ort":
        from edgeact.engines.ort_engine import OrtEngine

        eng = OrtEngine(folder, threads=1)
    else:
        raise ValueError(f"unknown engine {engine!r}")
    return eng.forward(ids)
