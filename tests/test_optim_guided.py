"""Guided ZO-SAM directions, dropout-safe queries and float64 hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny import LeastSquares, batch, mlp, resumed_halfway
from torch import nn

from zosam.optim import ZOSAM, derive_seed, make_closure

pytestmark = pytest.mark.usefixtures("one_thread")


def _zosam(model: nn.Module, **kw) -> ZOSAM:
    kw.setdefault("lr", 0.1)
    return ZOSAM(model.parameters(), torch.optim.SGD, model=model, **kw)


def _u(seed: int, step: int, i: int) -> torch.Tensor:
    """Query i's Gaussian direction of a (1, 6) float64 weight: the documented stream."""
    gen = torch.Generator().manual_seed(derive_seed(seed, step, i))
    return torch.randn(1, 6, generator=gen, dtype=torch.float64).view(-1)


# -- float64 hand computations (1e-12) ------------------------------------------------------
def test_gaussian_zosam_float64_matches_hand_computation_to_1e_12() -> None:
    ls = LeastSquares()
    rho, mu, lr, q, seed = 0.05, 1e-3, 0.1, 3, 9
    w0 = ls.w()
    ZOSAM(ls.model.parameters(), torch.optim.SGD, model=ls.model, rho=rho, mu=mu, q=q, seed=seed,
          lr=lr).step(ls.closure)
    g_hat = torch.zeros(6, dtype=torch.float64)
    for i in range(q):
        u = _u(seed, 0, i)
        g_hat += (ls.loss(w0 + mu * u) - ls.loss(w0 - mu * u)) / (2 * mu) * u / q
    e = rho * g_hat / g_hat.norm()
    torch.testing.assert_close(ls.seen[-1][0], w0 + e, rtol=0, atol=1e-12)
    torch.testing.assert_close(ls.w(), w0 - lr * ls.grad(w0 + e), rtol=0, atol=1e-12)


def test_guided_alpha0_ascends_along_the_last_gradient_with_the_measured_sign() -> None:
    """alpha = 0, k = 1, q = 1: e = rho sign(c) s / ||s||, s the gradient applied by the
    previous step, c the central difference along u = sqrt(d) a s / ||s|| on this batch."""
    ls = LeastSquares()
    rho, mu, lr, seed = 0.05, 1e-2, 0.1, 4
    opt = ZOSAM(ls.model.parameters(), torch.optim.SGD, model=ls.model, rho=rho, mu=mu, seed=seed,
                directions="guided", lr=lr)
    w0 = ls.w()
    opt.step(ls.closure)
    s = ls.grad(ls.seen[-1][0])  # the first step falls back to Gaussian; it keeps the gradient it applied
    torch.testing.assert_close(opt.last_gradient[0].view(-1), s, rtol=0, atol=1e-12)
    w1 = ls.w()
    torch.testing.assert_close(w1, w0 - lr * s, rtol=0, atol=1e-12)
    ls.seen.clear()
    opt.step(ls.closure)
    a = float(torch.randn(1, generator=torch.Generator().manual_seed(derive_seed(derive_seed(seed, 1, 0), 2)),
                          dtype=torch.float64))
    u = math.sqrt(6) * a * s / s.norm()
    (wp, gp, _), (wm, gm, _), (wf, gf, _) = ls.seen
    torch.testing.assert_close(wp, w1 + mu * u, rtol=0, atol=1e-12)
    torch.testing.assert_close(wm, w1 - mu * u, rtol=0, atol=1e-12)
    assert not gp and not gm and gf
    c = (ls.loss(w1 + mu * u) - ls.loss(w1 - mu * u)) / (2 * mu)
    e = rho * torch.sign(c * a) * s / s.norm()
    assert torch.sign(c * a) == torch.sign(ls.grad(w1) @ s)  # the measured sign is the true one here
    torch.testing.assert_close(wf, w1 + e, rtol=0, atol=1e-12)
    torch.testing.assert_close(ls.w(), w1 - lr * ls.grad(w1 + e), rtol=0, atol=1e-12)
    assert opt.pass_counts == {"forward": 2, "forward_no_grad": 4, "backward": 2}


# -- fallbacks ------------------------------------------------------------------------------------
def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_first_step_and_unusable_surrogates_fall_back_to_gaussian_directions() -> None:
    x, y = batch(0)
    for surrogate in (None, "zero", "nan"):
        a, b = mlp(), mlp()
        guided, plain = _zosam(a, directions="guided", seed=3), _zosam(b, seed=3)
        if surrogate is not None:
            fill = 0.0 if surrogate == "zero" else float("nan")
            guided.last_gradient = [torch.full_like(p, fill) for p in a.parameters()]
        guided.step(make_closure(a, F.cross_entropy, x, y))
        plain.step(make_closure(b, F.cross_entropy, x, y))
        assert guided._guided.k == 0, surrogate
        assert all(torch.equal(p, r) for p, r in zip(_weights(a), _weights(b), strict=True)), surrogate
    # With a surrogate the step differs from the Gaussian one.
    guided.step(make_closure(a, F.cross_entropy, x, y))
    plain.step(make_closure(b, F.cross_entropy, x, y))
    assert guided._guided.k == 1
    assert not all(torch.equal(p, r) for p, r in zip(_weights(a), _weights(b), strict=True))


def test_gradient_and_momentum_surrogates_drop_a_dependent_one() -> None:
    model = mlp()
    opt = _zosam(model, directions="guided", guide="gradient+momentum", momentum=0.9)
    ks = []
    for i in range(3):
        x, y = batch(i)
        opt.step(make_closure(model, F.cross_entropy, x, y))
        ks.append(opt._guided.k)
    # Step 0: nothing yet; step 1: SGD's first momentum buffer *is* the applied gradient
    # (dependent, dropped); step 2: two independent surrogates.
    assert ks == [0, 1, 2]


# -- the contracts: masks, resume, GradScaler, DDP (tests/test_optim_distributed.py) -------------
def test_guided_directions_touch_active_weights_only() -> None:
    model = mlp()
    w = model[0].weight
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    opt = _zosam(model, directions="guided", alpha=0.3, guide="gradient+momentum", momentum=0.9)
    opt.set_masks({w: mask})
    x, y = batch(0)
    base = make_closure(model, F.cross_entropy, x, y)
    pruned = []

    def closure(fraction: float = 1.0) -> torch.Tensor:
        pruned.append(w.detach()[~mask].abs().max().item())
        return base(fraction)

    for _ in range(4):
        opt.step(closure)
    assert opt._guided.k == 2
    assert len(pruned) == 12 and max(pruned) == 0.0  # queries, perturbed and final passes
    assert opt.last_gradient[0][~mask].abs().sum() > 0  # the kept gradient is dense; its use is masked


@pytest.mark.parametrize("guide", ["gradient", "momentum"])
def test_guided_resume_equals_uninterrupted(guide: str) -> None:
    def factory(m):
        return _zosam(m, directions="guided", guide=guide, alpha=0.2, q=2, seed=3, lr=0.05, momentum=0.9)

    (full, _), (resumed, _), ckpt = resumed_halfway(factory, 6)
    assert all(torch.equal(p, r) for p, r in zip(full.parameters(), resumed.parameters(), strict=True))
    if guide == "gradient":
        assert all(isinstance(g, torch.Tensor) for g in ckpt["opt"]["wrapper"]["last_gradient"])
    else:  # momentum only: no gradient is kept (no extra d-sized buffer)
        assert "last_gradient" not in ckpt["opt"]["wrapper"]


def test_kept_gradient_is_unscaled_under_a_grad_scaler() -> None:
    x, y = batch(0, n=32)
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**12)):
        model = mlp()
        opt = _zosam(model, directions="guided", max_grad_norm=0.5)
        for _ in range(3):
            opt.step(make_closure(model, F.cross_entropy, x, y), scaler=scaler)
            if scaler is not None:
                scaler.update()
        runs.append((opt.last_gradient, _weights(model)))
    (g_plain, w_plain), (g_scaled, w_scaled) = runs
    for a, b in zip(g_plain, g_scaled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)  # not 4096 times larger
    for a, b in zip(w_plain, w_scaled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in g_scaled))
    assert norm <= 0.5 + 1e-5  # the kept gradient is the clipped one that was applied


def test_guided_cosine_with_the_true_gradient_beats_gaussian() -> None:
    """Along a short training run, the guided estimate (alpha = 0, q = 1) points much closer
    to the current batch's gradient than the Gaussian one (about sqrt(2 / (pi d)))."""
    cos: dict[str, list[float]] = {"gaussian": [], "guided": []}
    for directions in cos:
        model = mlp()
        opt = _zosam(model, directions=directions, lr=0.05, momentum=0.9)
        for i in range(12):
            x, y = batch(200 + i, n=64)
            closure = make_closure(model, F.cross_entropy, x, y)
            g_hat = opt.estimate_gradient(closure)
            grads = torch.autograd.grad(closure(), list(model.parameters()))
            a = torch.cat([t.view(-1) for t in g_hat])
            b = torch.cat([t.view(-1) for t in grads])
            if i > 0:  # step 0 of a guided run is Gaussian (no surrogate yet)
                cos[directions].append(float(F.cosine_similarity(a, b, dim=0)))
            opt.step(closure)
    mean = {k: sum(v) / len(v) for k, v in cos.items()}
    assert all(c > 0 for c in cos["guided"]), cos  # the measured sign is right every time
    assert mean["guided"] > 0.3 and mean["guided"] > 3 * abs(mean["gaussian"]), mean


# -- dropout-safe queries -------------------------------------------------------------------------
def _dropout_mlp(p: float) -> nn.Module:
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(p), nn.Linear(32, 3))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in model.parameters():
            t.copy_(torch.randn(t.shape, generator=g) * 0.5)
    return model


def _mean_cosine(p: float, draws: int = 40, q: int = 8) -> float:
    """Mean cosine of q-query Gaussian estimates with the mask-averaged true gradient."""
    model = _dropout_mlp(p)
    x, y = batch(5, n=64)
    closure = make_closure(model, F.cross_entropy, x, y)
    params = list(model.parameters())
    true = torch.zeros(sum(t.numel() for t in params))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _ in range(200 if p > 0 else 1):  # average over dropout masks
            true += torch.cat([g.view(-1) for g in torch.autograd.grad(closure(), params)])
    opt = _zosam(model, q=q, mu=1e-3, seed=1)
    total = 0.0
    for i in range(draws):
        opt.step_count = i  # fresh directions and masks per draw
        est = torch.cat([t.view(-1) for t in opt.estimate_gradient(closure)])
        total += float(F.cosine_similarity(est, true, dim=0))
    return total / draws


def test_dropout_queries_share_one_mask_per_pair() -> None:
    clean, dropped = _mean_cosine(0.0), _mean_cosine(0.1)
    # Expected about sqrt(2 q / (pi d)) = 0.13 (d = 323). Without a shared mask per pair the
    # loss difference is mask noise and the mean cosine is about 0 (0.001 measured).
    assert clean > 0.08 and abs(dropped - clean) < 0.3 * clean, (clean, dropped)


def test_queries_leave_the_callers_rng_untouched() -> None:
    model = _dropout_mlp(0.5)
    x, y = batch(0)
    opt = _zosam(model, q=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        opt.estimate_gradient(make_closure(model, F.cross_entropy, x, y))
        after = torch.rand(4)
        torch.manual_seed(11)
        expected = torch.rand(4)
    assert torch.equal(after, expected)


# -- validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "field"), [
    ({"alpha": -0.1}, "alpha"), ({"alpha": 1.5}, "alpha"), ({"alpha": float("nan")}, "alpha"),
    ({"guide": "hessian"}, "guide"), ({"directions": "guided", "guide": "momentum"}, "guide"),
    ({"directions": "rademacher"}, "directions"),
])
def test_bad_guided_arguments_name_the_field(kwargs: dict, field: str) -> None:
    model = mlp()
    with pytest.raises(ValueError, match=rf"^{field}=.*(allowed|must be)"):
        _zosam(model, **kwargs)  # SGD without momentum: guide="momentum" has nothing to follow
