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


ENGINES = ["ort", pytest.param("native", marks=needs_native)]


@pytest.fixture(scope="module", params=ENGINES)
def stories(request, stories_fp32_dir):
    import edgeact

    return edgeact.load(stories_fp32_dir, engine=request.param, threads=1)


def test_next_turn_reuses_the_cache_and_matches_a_fresh_forward(stories):
    s = stories.session()
    turn1 = [1, 5, 9, 30, 31, 77, 12]
    s.prefill(turn1)
    assert s.last == {"cached_tokens": 0, "prefilled_tokens": 7}
    turn2 = turn1 + [44, 45, 46]
    got = s.prefill(turn2)
    assert s.last == {"cached_tokens": 7, "prefilled_tokens": 3}
    np.testing.assert_allclose(got, stories.forward(turn2)[-1], atol=ATOL, rtol=0)
    # the same prompt again: only its last token runs (its logits start the reply)
    again = s.prefill(turn2)
    assert s.last == {"cached_tokens": 9, "prefilled_tokens": 1}
    np.testing.assert_allclose(again, got, atol=ATOL, rtol=0)


def test_divergent_prefix_truncates_to_the_common_part(stories):
    s = stories.session()
    s.prefill([1, 5, 9, 30, 31, 77, 12, 40])
    other = [1, 5, 9, 30, 200, 201]
    got = s.prefill(other)
    assert s.last == {"cached_tokens": 4, "prefilled_tokens": 2}
    assert s.ids == other and s.engine.n_past == len(other)
    np.testing.assert_allclose(got, stories.forward(other)[-1], atol=ATOL, rtol=0)


def test_generation_turns_equal_fresh_generation(stories):
    s = stories.session()
    first = s.generate([1, 5, 9, 30], max_new_tokens=6)
    prompt2 = first.prompt_ids + first.ids + [60, 61]
    second = s.generate(prompt2, max_new_tokens=6)
    # every token but the last generated one is in the cache
    assert second.stats["cached_tokens"] == len(first.prompt_ids) + len(first.ids) - 1
    assert second.ids == stories.generate(prompt2, max_new_tokens=6).ids
    assert second.stats["memory_bytes"] > 0


def test_sessions_share_weights_and_keep_their_own_cache(stories):
    a, b = stories.session(), stories.session()
    if stories.engine.name == "native":
        assert a.engine.model is b.engine.model is stories.engine.model
        assert a.engine.session is not b.engine.session
    pa, pb = [1, 5, 9, 30], [1, 70, 71]
    ga = [a.generate(pa, max_new_tokens=1).ids[0]]
    gb = [b.generate(pb, max_new_tokens=1).ids[0]]
    for _ in range(4):  # interleaved turns: each session's cache is its own
        ga.append(a.generate(pa + ga, max_new_tokens=1).ids[0])
        gb.append(b.generate(pb + gb, max_new_tokens=1).ids[0])
    assert ga == stories.generate(pa, max_new_tokens=5).ids
    assert gb == stories.generate(pb, max_new_tokens=5).ids


def test_per_call_steering_matches_model_steering_and_is_not_cached_across(stories):
    rng = np.random.default_rng(0)
    vec = rng.standard_normal(stories.config.hidden_size).astype(np.float32)
    prompt = [1, 5, 9, 30]
    s = stories.session()
    steered = s.generate(prompt, max_new_tokens=8, steering=[{"vector": vec, "scale": 3.0, "layers": "1-3"}])
    with stories.steering(vec, scale=3.0, layers="1-3"):
        want = stories.generate(prompt, max_new_tokens=8)
    assert steered.ids == want.ids
    plain = s.generate(prompt, max_new_tokens=8)
    assert plain.stats["cached_tokens"] == 0  # the cached prompt was computed under other steering
    assert plain.ids == stories.generate(prompt, max_new_tokens=8).ids
    assert plain.ids != steered.ids
    with pytest.raises(ValueError, match="steering\\[0\\].*NaN"):
        s.generate(prompt, max_new_tokens=2, steering=[{"vector": np.full(vec.shape, np.nan)}])
    with pytest.raises(ValueError, match="hidden size"):
        s.generate(prompt, max_new_tokens=2, steering=[{"vector": vec[:-1], "layers": 1}])


def test_prompt_longer_than_context_is_an_error(stories):
    s = stories.session()
    with pytest.raises(ValueError, match="more than the context"):
        s.generate([1] * (s.engine.max_context + 1), max_new_tokens=1)
