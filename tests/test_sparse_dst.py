"""Dynamic sparse training: exact counts over 1,000 updates, zero pruned weights after every
optimizer step (SGD, SAM, ZO-SAM), zero-initialised growth with reset optimizer state."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zosam.optim import SAM, ZOSAM, FirstOrder, make_closure
from zosam.sparse import Masking, SparsityConfig, drop_fraction_at, is_update_step


def mlp(seed: int = 0) -> nn.Sequential:
    """A tiny MLP; every layer maskable when first layer and classifier are not kept dense."""
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 4))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return net


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=gen)
    return x, (x[:, :4].argmax(1))


def make_optimizer(name: str, model: nn.Module) -> FirstOrder:
    kw = dict(model=model, lr=0.05, momentum=0.9)
    if name == "base":
        return FirstOrder(model.parameters(), torch.optim.SGD, **kw)
    if name == "sam":
        return SAM(model.parameters(), torch.optim.SGD, rho=0.05, **kw)
    return ZOSAM(model.parameters(), torch.optim.SGD, rho=0.05, mu=1e-3, **kw)


def sparse_config(method: str, **kw: object) -> SparsityConfig:
    base = dict(
        method=method,
        density=0.2,
        update_interval=1,
        drop_fraction=0.3,
        drop_schedule="constant",
        end_fraction=1.0,
        dense_first_layer=False,
        dense_classifier=False,
    )
    base.update(kw)
    return SparsityConfig(**base)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("method", ["rigl", "set", "mest"])
def test_thousand_updates_keep_counts_and_zeros(method: str) -> None:
    """1,000 updates (one per step); the steps cycle through SGD, SAM and ZO-SAM."""
    model = mlp()
    updates = 1000
    masking = Masking(model, sparse_config(method), total_steps=updates + 2, generator_seed=1)
    masking.init_masks()
    opts = [make_optimizer(name, model) for name in ("base", "sam", "zosam")]
    for opt in opts:
        masking.attach(opt)
    counts = {n: int(m.sum()) for n, m in masking.masks.items()}
    assert counts == masking.target_counts
    x, y = data(32, seed=2)
    changed_total = 0
    for step in range(updates):
        opt = opts[step % 3]
        batch = slice(step % 4 * 8, step % 4 * 8 + 8)
        opt.step(make_closure(model, F.cross_entropy, x[batch], y[batch]))
        for n, m in masking.masks.items():  # after the optimizer step
            assert bool((masking.params[n][~m] == 0).all()), f"{n}: pruned weight non-zero"
        assert masking.step(step)
        changed_total += masking.changed_last_update
        for n, m in masking.masks.items():  # after the update
            assert int(m.sum()) == counts[n], f"{n}: count drifted at update {step}"
            assert bool((masking.params[n][~m] == 0).all())
            for o in opts:
                assert torch.equal(o.masks[masking.params[n]].bool(), m), "optimizer mask is stale"
    assert masking.num_updates == updates
    # Each update drops round(0.3 * active) per layer and grows as many elsewhere.
    per_update = sum(2 * math.floor(0.3 * c + 0.5) for c in counts.values())
    assert changed_total == updates * per_update


def test_dsr_keeps_global_count_and_reallocates() -> None:
    model = mlp()
    masking = Masking(model, sparse_config("dsr"), total_steps=300, generator_seed=3)
    masking.init_masks()
    opt = make_optimizer("base", model)
    masking.attach(opt)
    start = {n: int(m.sum()) for n, m in masking.masks.items()}
    x, y = data(8, seed=4)
    for step in range(200):
        opt.step(make_closure(model, F.cross_entropy, x, y))
        masking.step(step)
        assert sum(int(m.sum()) for m in masking.masks.values()) == sum(start.values())
        assert all(int(m.sum()) >= 1 for m in masking.masks.values())
    end = {n: int(m.sum()) for n, m in masking.masks.items()}
    assert end != start  # weights moved between layers


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_grown_weights_start_at_zero_with_zero_optimizer_state(base: str) -> None:
    model = mlp()
    cfg = sparse_config("rigl", update_interval=5)
    masking = Masking(model, cfg, total_steps=100, generator_seed=0)
    masking.init_masks()
    if base == "sgd":
        opt = FirstOrder(model.parameters(), torch.optim.SGD, model=model, lr=0.05, momentum=0.9)
        keys = ["momentum_buffer"]
    else:
        opt = FirstOrder(model.parameters(), torch.optim.AdamW, model=model, lr=1e-2)
        keys = ["exp_avg", "exp_avg_sq"]
    masking.attach(opt)
    x, y = data(16, seed=5)
    for step in range(4):
        opt.step(make_closure(model, F.cross_entropy, x, y))
        assert not masking.step(step)
    before = {n: m.clone() for n, m in masking.masks.items()}
    opt.step(make_closure(model, F.cross_entropy, x, y))
    for n in before:  # dense gradients make the state non-zero at pruned positions too
        state = opt.base_optimizer.state[masking.params[n]]
        assert all(bool((state[k][~before[n]] != 0).any()) for k in keys)
    assert masking.step(4)
    for n, m in masking.masks.items():
        p = masking.params[n]
        grown, dropped = m & ~before[n], before[n] & ~m
        assert int(grown.sum()) == int(dropped.sum()) > 0
        assert bool((p[grown] == 0).all())
        state = opt.base_optimizer.state[p]
        for k in keys:
            assert bool((state[k][grown | dropped] == 0).all()), f"{k} not reset"
            assert bool((state[k][m & before[n]] != 0).any()), f"{k} reset where unchanged"


def test_rigl_grows_where_the_gradient_is_largest() -> None:
    model = mlp()
    masking = Masking(model, sparse_config("rigl", update_interval=1), total_steps=10)
    masking.init_masks()
    x, y = data(16, seed=6)
    F.cross_entropy(model(x), y).backward()
    before = {n: m.clone() for n, m in masking.masks.items()}
    grads = {n: masking.params[n].grad.abs().clone() for n in before}
    masking.step(0)
    for n, m in masking.masks.items():
        grown = m & ~before[n]
        inactive = ~before[n]
        # Every grown weight's |g| is >= every non-grown inactive weight's |g|.
        assert grads[n][grown].min() >= grads[n][inactive & ~grown].max()


def test_rigl_without_gradients_says_what_to_do() -> None:
    model = mlp()
    masking = Masking(model, sparse_config("rigl"), total_steps=10)
    masking.init_masks()
    with pytest.raises(RuntimeError, match="needs the dense gradients"):
        masking.step(0)


def test_schedule() -> None:
    cfg = SparsityConfig(method="rigl", update_interval=100, drop_fraction=0.3, end_fraction=0.75)
    total = 1000
    updates = [s for s in range(total) if is_update_step(cfg, s, total)]
    assert updates == [99, 199, 299, 399, 499, 599, 699]  # t = 100..700 < 750
    assert drop_fraction_at(cfg, -1, total) == pytest.approx(0.3)  # t = 0
    assert drop_fraction_at(cfg, 374, total) == pytest.approx(0.15)  # t = T/2
    assert drop_fraction_at(cfg, 749, total) == 0.0
    lin = SparsityConfig(method="mest", drop_schedule="linear", end_fraction=0.5)
    assert drop_fraction_at(lin, 249, 1000) == pytest.approx(0.15)
    const = SparsityConfig(method="set", drop_schedule="constant")
    assert drop_fraction_at(const, 600, 1000) == pytest.approx(0.3)
    assert drop_fraction_at(const, 800, 1000) == 0.0
