"""Layer densities (uniform, ER, ERK) against hand computations, and exact integer counts."""

from __future__ import annotations

import math

import pytest
import torch

from zosam.sparse import layer_counts, layer_densities

# A small first conv (high raw score), a big conv, and a linear layer.
SHAPES = {"a": (4, 3, 3, 3), "b": (64, 32, 3, 3), "c": (10, 64)}
N = {"a": 108, "b": 18432, "c": 640}
TOTAL = sum(N.values())  # 19180


def test_erk_without_capping_matches_hand_computation() -> None:
    # ERK raw scores sum(shape)/prod(shape): a = 13/108, b = 102/18432, c = 74/640, so
    # sum_l raw_l * n_l = 13 + 102 + 74 = 189 and eps = density * N / 189.
    density = 0.01
    eps = density * TOTAL / 189
    want = {"a": eps * 13 / 108, "b": eps * 102 / 18432, "c": eps * 74 / 640}
    assert max(want.values()) < 1  # no layer is capped at this density
    got = layer_densities(SHAPES, density, "erk")
    assert got == pytest.approx(want, rel=1e-12)


def test_erk_caps_layers_at_one_and_redistributes() -> None:
    # density 0.1: eps = 1918 / 189 = 10.15 puts a (1.22) and c (1.17) above 1. Both are
    # set dense, and b takes the rest of the budget: (1918 - 108 - 640) / 18432.
    got = layer_densities(SHAPES, 0.1, "erk")
    assert got["a"] == 1.0
    assert got["c"] == 1.0
    assert got["b"] == pytest.approx((0.1 * TOTAL - 108 - 640) / 18432, rel=1e-12)


def test_er_ignores_the_kernel_and_uniform_is_flat() -> None:
    # ER raw scores: a = 7/12, b = 96/2048, c = 74/640 (kernel dimensions dropped).
    density = 0.01
    raw = {"a": 7 / 12, "b": 96 / 2048, "c": 74 / 640}
    eps = density * TOTAL / sum(raw[n] * N[n] for n in N)
    want = {n: eps * raw[n] for n in N}
    assert max(want.values()) < 1
    assert layer_densities(SHAPES, density, "er") == pytest.approx(want, rel=1e-12)
    assert layer_densities(SHAPES, 0.3, "uniform") == {n: 0.3 for n in N}


def test_power_scale_flattens_erk() -> None:
    # power_scale -> 0 makes every raw score 1, i.e. uniform; 0.5 lies in between.
    erk = layer_densities(SHAPES, 0.01, "erk", 1.0)
    half = layer_densities(SHAPES, 0.01, "erk", 0.5)
    assert erk["a"] / erk["b"] > half["a"] / half["b"] > 1.0


@pytest.mark.parametrize("distribution", ["uniform", "erk", "er"])
@pytest.mark.parametrize("density", [1.0, 0.5, 0.1, 0.05, 0.02, 0.001])
def test_densities_meet_the_budget(distribution: str, density: float) -> None:
    got = layer_densities(SHAPES, density, distribution)
    assert all(0 < d <= 1 for d in got.values())
    assert sum(got[n] * N[n] for n in N) == pytest.approx(density * TOTAL, rel=1e-9)


@pytest.mark.parametrize("distribution", ["uniform", "erk", "er"])
def test_counts_sum_exactly_on_random_shapes(distribution: str) -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        shapes = {}
        for i in range(int(torch.randint(1, 8, (1,), generator=gen))):
            dims = torch.randint(1, 40, (int(torch.randint(2, 5, (1,), generator=gen)),), generator=gen)
            shapes[f"l{i}"] = tuple(int(d) for d in dims)
        total = sum(math.prod(s) for s in shapes.values())
        density = float(torch.rand(1, generator=gen)) * 0.99 + 0.005
        counts = layer_counts(shapes, density, distribution)
        assert sum(counts.values()) == max(1, math.floor(density * total + 0.5))
        assert all(0 <= counts[n] <= math.prod(s) for n, s in shapes.items())
        if sum(counts.values()) >= len(shapes):
            assert min(counts.values()) >= 1  # rounding never empties a layer


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match=r"density=0 is invalid"):
        layer_densities(SHAPES, 0, "erk")
    with pytest.raises(ValueError, match=r"distribution='erdos' is invalid"):
        layer_densities(SHAPES, 0.1, "erdos")
