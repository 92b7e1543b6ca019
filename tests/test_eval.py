"""Evaluation metrics against numpy definitions, and the quality ordering on real
fp32 weights (stories260K): KL(int8) < KL(int4 g32) < KL(int4 g128)."""
import numpy as np
import pytest

from edgeact.converters.convert import convert
from edgeact.evaluate import Reference, compare_logits


def test_metrics_against_definitions():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((9, 20))
    ids = rng.integers(0, 20, 9)
    same = compare_logits(ref, ref, ids)
    assert same.kl == pytest.approx(0, abs=1e-12) and same.top1 == 1.0 and same.ppl_ratio == pytest.approx(1)
    other = ref + rng.standard_normal((9, 20)) * 0.5
    q = compare_logits(other, ref, ids)
    p = np.exp(ref[:-1]) / np.exp(ref[:-1]).sum(-1, keepdims=True)
    r = np.exp(other[:-1]) / np.exp(other[:-1]).sum(-1, keepdims=True)
    assert q.kl == pytest.approx(float((p * np.log(p / r)).sum(-1).mean()), rel=1e-9)
    assert q.ppl_ref == pytest.approx(float(np.exp(-np.log(p[np.arange(8), ids[1:]]).mean())), rel=1e-9)


def test_quality_ordering_stories260k(stories260k, tmp_path):
    ref = Reference(stories260k, n_tokens=256, seed=0)
    kls = {}
    for name, kw in {"int8": dict(quant="int8"), "int4-g32": dict(quant="int4", group_size=32),
                     "int4-g128": dict(quant="int4", group_size=128)}.items():
        out = convert(stories260k, tmp_path / name, progress=False, **kw)
        kls[name] = ref.compare(out).kl
    assert kls["int8"] < kls["int4-g32"] < kls["int4-g128"], kls
