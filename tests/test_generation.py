"""Sampling semantics against numpy on synthetic logits."""
import numpy as np
import pytest

from edgeact.generation import GenerationConfig, choose, filter_logits


def test_greedy_is_argmax():
    x = np.array([0.1, 3.0, -1.0, 2.9])
    assert choose(x, GenerationConfig(temperature=0), np.random.default_rng(0)) == 1


def test_top_k_keeps_k_largest():
    x = np.array([1.0, 5.0, 3.0, 4.0, 2.0])
    f = filter_logits(x, top_k=2)
    assert set(np.flatnonzero(np.isfinite(f))) == {1, 3}


def test_top_p_keeps_smallest_nucleus():
    p = np.array([0.5, 0.3, 0.15, 0.05])
    f = filter_logits(np.log(p), top_p=0.79)
    assert set(np.flatnonzero(np.isfinite(f))) == {0, 1}
    f = filter_logits(np.log(p), top_p=0.81)
    assert set(np.flatnonzero(np.isfinite(f))) == {0, 1, 2}
    # always at least one token
    assert np.isfinite(filter_logits(np.log(p), top_p=1e-9)).sum() == 1


def test_sampling_frequencies_follow_softmax():
    rng = np.random.default_rng(0)
    x = np.log(np.array([0.6, 0.3, 0.1]))
    n = 20000
    counts = np.bincount([choose(x, GenerationConfig(temperature=1.0), rng) for _ in range(n)], minlength=3)
    # 5 standard deviations of a binomial proportion
    assert np.all(np.abs(counts / n - [0.6, 0.3, 0.1]) <= 5 * np.sqrt(0.25 / n))


def test_repetition_penalty_demotes_seen_tokens():
    x = np.array([2.0, 1.9, -1.0])
    cfg = GenerationConfig(temperature=0, repetition_penalty=1.5)
    assert choose(x, cfg, np.random.default_rng(0), history=[0]) == 1


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_k=-1), dict(top_p=1.5), dict(max_new_tokens=-2),
                                dict(repetition_penalty=0)])
def test_bad_settings(kw):
    with pytest.raises(ValueError):
        GenerationConfig(**kw).validate()
