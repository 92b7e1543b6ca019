"""Sessions that keep their KV cache across turns: native truncate, prefix reuse, shared weights."""
from __future__ import annotations

import numpy as np
import pytest

from edgeact.engines import native_available

needs_native = pytest.mark.skipif(not native_available(), reason="native runtime not built")

# decode vs prefill of the same tokens differ by float reassociation only (as in test_native_engine)
ATOL = 2e-4


@needs_native
def test_native_truncate_continues_from_common_prefix(stories_fp32_dir):
    from edgeact.runtime import NativeModel

    m = NativeModel(stories_fp32_dir)
    a, b = m.session(threads=1, n_ctx=64), m.session(threads=1, n_ctx=64)
    ids = np.arange(1, 13, dtype=np.int64)
    other = np.array([40, 41, 42, 43], dtype=np.int64)
    a.forward(ids, all_logits=True)
    a.truncate(8)
    assert a.n_past == 8
    got = a.forward(other, all_logits=True)
    want = b.forward(np.concatenate([ids[:8], other]), all_logits=True)[8:]
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="cache holds 12 tokens"):
        a.truncate(13)
    with pytest.raises(ValueError):
        a.truncate(-1)
    assert a.n_past == 12


@needs_native
def test_native_session_memory_grows_with_context(stories_fp32_dir):
    from edgeact.runtime import NativeModel

    m = NativeModel(stories_fp32_dir)
    small, big = m.session(threads=1, n_ctx=32, max_chunk=16), m.session(threads=1, n_ctx=64, max_chunk=16)
    cfg_kv = 2 * 4 * m.n_layers * m.n_kv_heads * m.head_dim  # K and V, float32, per position
    assert big.memory_bytes - small.memory_bytes == cfg_kv * 32
