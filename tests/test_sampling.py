"""The calibration/evaluation sampler: a sample depends on its seed alone (not on the batch it
shares, not on the thread count), and its decode-step products compute nn.Linear's function."""
import numpy as np
import pytest
import torch

from edgeact.converters import sampling
from edgeact.converters.random_model import random_source
from edgeact.converters.torch_ref import build_torch_model


@pytest.fixture(scope="module")
def tiny_model():
    return build_torch_model(random_source("tiny", seed=4))


@pytest.mark.parametrize("rows", [1, 4, 16, 17, 64])
def test_decode_products_compute_the_linear(tiny_model, rows):
    """W·xᵀ for a few rows (above _DECODE_ROWS torch's own x·Wᵀ): the same function within float32
    rounding; the model's modules are plain nn.Linear again after the block."""
    lin = next(m for m in tiny_model.modules() if type(m) is torch.nn.Linear)
    x = torch.randn(2, rows, lin.in_features, generator=torch.Generator().manual_seed(rows))
    ref = torch.nn.functional.linear(x, lin.weight, lin.bias)
    with torch.no_grad(), sampling._decode_products(tiny_model, 2):
        got = lin(x)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert all("forward" not in m.__dict__ for m in tiny_model.modules())


def test_a_sample_depends_on_its_seed_alone(tiny_model, monkeypatch):
    one = sampling.sample_batch(tiny_model, 24, seeds=[7], bos_id=1)
    batch = sampling.sample_batch(tiny_model, 24, seeds=[3, 7, 11], bos_id=1)
    assert np.array_equal(batch[1], one[0])
    monkeypatch.setattr(sampling, "physical_cores", lambda: 1)
    single = sampling.sample_batch(tiny_model, 24, seeds=[3, 7, 11], bos_id=1)
    assert np.array_equal(single, batch), "the decode products' thread count changed the sample"
    assert len({tuple(r) for r in batch}) == 3
