"""What a failed native forward leaves behind, on a model with sliding-window layers (Gemma 3 shape,
window 8: a sliding cache of 8 + 63 rows that moves its last 39 rows to the front when full).
A failure is injected at a chosen executed step (ea_session_inject_failure, edgeact_tools.h).
The session goes back to the tokens it held before the call: the next forward gives the logits of a
session that never failed, bit for bit. When the failed call moved a sliding cache past the rows
its next query needs, every forward but one from position 0 is refused with a clear error (before,
it wrote cache rows before the buffer), and a reset makes the session whole again."""
from __future__ import annotations

import numpy as np
import pytest

runtime = pytest.importorskip("edgeact.runtime")
if not runtime.available():
    pytest.skip(runtime.unavailable_reason(), allow_module_level=True)

from edgeact.converters.convert import convert  # noqa: E402
from edgeact.converters.random_model import random_source  # noqa: E402
from edgeact.runtime import NativeModel, NativeError  # noqa: E402
from edgeact.runtime._native import lib  # noqa: E402
from test_native_engine import OrtRef, _ids  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    src = random_source("gemma3-tiny", seed=1, max_position_embeddings=256)
    return convert(src, tmp_path_factory.mktemp("g") / "fp32", quant="fp32", progress=False)


def _fail_at(sess, at):
    assert lib.ea_session_inject_failure(sess._ptr, at) == 0


def _steps_per_chunk(sess):
    return lib.ea_session_profile_count(sess._ptr)


@pytest.mark.parametrize("prefix,n,where", [
    (60, 20, "last"),     # the call moves the sliding caches to the front (at position 71), then fails
    (60, 20, "middle"),   # ... fails in the second of its 10-token chunks, some layers moved, some not
    (30, 5, "first"),     # fails before anything ran
    (9, 1, "last"),       # a decode step
])
def test_failed_forward_leaves_the_session_as_it_was(folder, prefix, n, where):
    model = NativeModel(folder)
    ids = _ids(model.vocab, prefix + n, seed=3)
    clean, sess = model.session(threads=1, max_chunk=10), model.session(threads=1, max_chunk=10)
    clean.forward(ids[:prefix])
    want = clean.forward(ids[prefix:], all_logits=True)
    sess.forward(ids[:prefix])
    per_chunk, chunks = _steps_per_chunk(sess), -(-n // 10)
    _fail_at(sess, {"first": 1, "middle": per_chunk + per_chunk // 2, "last": per_chunk * chunks}[where])
    with pytest.raises(NativeError, match="injected failure"):
        sess.forward(ids[prefix:], all_logits=True)
    assert sess.n_past == prefix
    np.testing.assert_array_equal(sess.forward(ids[prefix:], all_logits=True), want)
    # and it carries on: a decode step past the failure point equals onnxruntime
    ref = OrtRef(folder)
    ref.forward(ids)
    t = _ids(model.vocab, 1, seed=9)
    assert np.abs(sess.forward(t) - ref.forward(t)[-1]).max() <= 1e-3


def test_failure_after_the_window_moved_on_asks_for_a_reset(folder):
    """10 tokens held, then 100 more in one chunk: the sliding caches move to the front at positions
    71 and 103 and then hold positions 64.., far past the window of position 10. The session refuses
    to continue from there (and truncation back into the lost rows), and runs again after a reset."""
    model = NativeModel(folder)
    ids = _ids(model.vocab, 110, seed=4)
    sess = model.session(threads=1, max_chunk=128)
    sess.forward(ids[:10])
    _fail_at(sess, _steps_per_chunk(sess))   # the logits step, after every layer ran
    with pytest.raises(NativeError, match="injected failure.*no longer holds the window before position 10"):
        sess.forward(ids[10:])
    with pytest.raises(NativeError, match="reset the session"):
        sess.forward(ids[10:12])
    with pytest.raises(ValueError, match="sliding-window layer"):
        sess.truncate(5)
    sess.reset()
    got = sess.forward(ids, all_logits=True)
    np.testing.assert_array_equal(got, model.session(threads=1, max_chunk=128).forward(ids, all_logits=True))
    assert np.abs(got - OrtRef(folder).forward(ids)).max() <= 1e-3


def test_injection_is_checked_and_one_shot(folder):
    model = NativeModel(folder)
    sess = model.session(threads=1)
    assert lib.ea_session_inject_failure(sess._ptr, -1) != 0
    ids = _ids(model.vocab, 4, seed=5)
    _fail_at(sess, 10 ** 6)   # more steps than the call has: it runs, and the next one is not armed
    sess.forward(ids[:2])
    sess.forward(ids[2:])
    assert sess.n_past == 4
