"""The GGUF we hand llama.cpp for its baseline holds the same model: llama.cpp's
f32 logits on it match our fp32 torch reference."""
import numpy as np
import pytest

from edgeact.converters.gguf_export import write_gguf
from edgeact.converters.torch_ref import build_torch_model


def _llama_logits(path, ids):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (optional baseline)")
    m = llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False,
                        type_k=0, type_v=0)  # f32 KV cache (GGML_TYPE_F32): the default f16 cache adds ~1e-2 error
    m.eval(list(ids))
    return np.array(m.scores[: len(ids)], dtype=np.float32)


@pytest.mark.parametrize("shape", ["tiny"])
def test_llamacpp_reads_our_export_f32(tmp_path, shape):
    import torch

    from edgeact.converters.random_model import random_source

    src = random_source(shape, seed=3)
    path = write_gguf(src, tmp_path / "m.gguf", dtype="f32")
    ids = np.array([1, 17, 42, 5, 99, 3, 250, 7], dtype=np.int64)
    got = _llama_logits(path, ids)
    with torch.no_grad():
        ref = build_torch_model(src)(torch.from_numpy(ids)[None]).logits[0].numpy()
    # llama.cpp computes in f32 with its own op order: agreement to ~1e-3 of the logit scale.
    assert np.abs(got - ref).max() <= 2e-3 * max(1.0, np.abs(ref).max())
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_llamacpp_reads_stories260k_export(tmp_path, stories260k):
    import torch

    from edgeact.converters.readers import read_source

    src = read_source(stories260k)
    path = write_gguf(src, tmp_path / "s.gguf", dtype="f32")
    ids = np.array([1, 403, 407, 261, 378, 10, 66, 300, 9], dtype=np.int64)
    got = _llama_logits(path, ids)
    with torch.no_grad():
        ref = build_torch_model(src)(torch.from_numpy(ids)[None]).logits[0].numpy()
    assert np.abs(got - ref).max() <= 2e-3 * max(1.0, np.abs(ref).max())
