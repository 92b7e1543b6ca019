"""Mixed bits per tensor: the greedy allocation over each tensor's convex hull respects the
budget and spends it where the weighted error drops most; converted folders hit the budget
(in bits per weight and in bytes on disk) and run in onnxruntime."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgeact.converters.mixed import Choice, _hull, allocate, format_bytes, mixed_plan, quantize_as
from edgeact.converters.model import ConversionError
from edgeact.converters.random_model import random_source


def test_format_bytes_are_the_packed_sizes():
    w = np.random.default_rng(0).standard_normal((24, 200)).astype(np.float32)
    for label in ("int4-g128", "int4-g64", "int4-g32", "int4-g32-fmin", "int8-g64", "int8-g32"):
        assert quantize_as(w, label).file_nbytes == format_bytes(label, 24, 200), label


def test_hull_drops_dominated_and_concave_points():
    pts = [("a", 100, 10.0), ("b", 150, 9.9), ("c", 200, 2.0), ("d", 300, 1.0), ("e", 250, 5.0)]
    hull = _hull(pts)
    assert [p[0] for p in hull] == ["a", "c", "d"]


def test_allocate_respects_budget_and_prefers_steep_upgrades():
    steep = Choice("steep", 1, 1, [("lo", 100, 100.0), ("hi", 200, 0.0)])
    flat = Choice("flat", 1, 1, [("lo", 100, 10.0), ("hi", 200, 9.0)])
    used = allocate([steep, flat], 300)
    assert used == 300 and steep.pick == 1 and flat.pick == 0
    with pytest.raises(ConversionError, match="below the smallest"):
        allocate([Choice("x", 1, 1, [("lo", 100, 1.0)])], 50)


@pytest.fixture(scope="module")
def tiny():
    return random_source("tiny", seed=4, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
                         head_dim=16)


@pytest.mark.parametrize("bpw", [4.6, 5.5, 7.0])
def test_plan_hits_target_bpw(tiny, bpw):
    override, report = mixed_plan(tiny, target_bpw=bpw, calib_tokens=64, progress=False)
    assert report["bits_per_weight"] <= bpw
    n = sum(qw.N * qw.K for qw in (f() for f in override.values()))
    assert sum(f().file_nbytes for f in override.values()) == report["linear_bytes"]
    assert report["linear_bytes"] * 8 / n <= bpw
    # a richer budget never buys a worse recipe: bytes grow, formats only move up
    assert sum(report["recipe"].values()) == 2 * 7 + 1


def test_cli_max_size_folder_fits(tmp_path, tiny_hf_dir):
    from edgeact.cli import main
    from edgeact.evaluate import folder_bytes

    out = tmp_path / "m"
    assert main(["convert", str(tiny_hf_dir), "-o", str(out), "--max-size", "0.2", "--calib-tokens", "64",
                 "--quiet"]) == 0
    meta = json.loads((out / "edgeact.json").read_text())["quantization"]
    assert meta["weights"] == "mixed" and folder_bytes(out) <= 0.2e6
    import edgeact

    logits = edgeact.load(out, engine="ort").forward([1, 2, 3, 4])
    assert np.all(np.isfinite(logits))
