"""Correctness of SAM, ZO-SAM and the plain step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny import batch, mlp, resumed_halfway, train_steps
from torch import nn

from zosam.optim import OPTIMIZERS, SAM, ZOSAM, FirstOrder, make_closure


def _zosam(model: nn.Module, **kw) -> ZOSAM:
    kw.setdefault("lr", 0.1)
    return ZOSAM(model.parameters(), torch.optim.SGD, model=model, **kw)


class Quadratic(nn.Module):
    """L(w) = 0.5 w^T A w + b^T w with a known gradient A w + b."""

    def __init__(self, d: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        m = torch.randn(d, d, generator=g, dtype=torch.float64)
        self.register_buffer("A", m @ m.T / d + torch.eye(d, dtype=torch.float64))
        self.register_buffer("b", torch.randn(d, generator=g, dtype=torch.float64))
        self.w = nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))

    def loss(self, fraction: float = 1.0) -> torch.Tensor:
        return 0.5 * self.w @ self.A @ self.w + self.b @ self.w

    def grad(self) -> torch.Tensor:
        return (self.A @ self.w + self.b).detach()


def _estimates(model: Quadratic, n: int, **kw) -> list[torch.Tensor]:
    opt = ZOSAM(model.parameters(), torch.optim.SGD, model=None, lr=0.0, mu=1e-3, **kw)
    out = []
    for i in range(n):
        opt.step_count = i  # a fresh set of directions per draw
        out.append(opt.estimate_gradient(model.loss)[0])
    return out


@pytest.mark.parametrize("directions", ["gaussian", "sphere"])
def test_central_rge_is_unbiased_on_a_quadratic(directions: str) -> None:
    # E[(u.g) u] = g for E[u u^T] = I; the central difference is exact on a quadratic.
    # With d = 10 and N draws the relative RMS error of the mean is sqrt((d + 1) / N) ~ 0.03.
    model = Quadratic(10)
    mean = torch.stack(_estimates(model, 12000, directions=directions)).mean(0)
    rel = (mean - model.grad()).norm() / model.grad().norm()
    assert rel < 0.12, f"relative error of the mean estimate {rel:.3f}"


def test_rge_cosine_grows_with_q() -> None:
    model = Quadratic(100)
    g = model.grad()
    cos = {
        q: torch.stack([F.cosine_similarity(e, g, dim=0) for e in _estimates(model, 150, q=q)]).mean().item()
        for q in (1, 4, 16)
    }
    # Expected about sqrt(2 q / (pi d)): 0.08, 0.16, 0.32.
    assert cos[1] < cos[4] < cos[16], cos
    assert cos[16] > 2 * cos[1], cos


def test_sam_matches_hand_computation() -> None:
    # Linear least squares: L(w) = mean((X w - y)^2), grad = 2/n X^T (X w - y).
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    w0 = torch.randn(4, generator=g, dtype=torch.float64)
    model = nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w0)
    rho, lr = 0.05, 0.1
    seen = []

    def closure() -> torch.Tensor:
        seen.append(model.weight.detach().clone().view(-1))
        return ((model(X).view(-1) - y) ** 2).mean()

    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, model=model, lr=lr)
    opt.step(closure)

    def grad(w: torch.Tensor) -> torch.Tensor:
        return 2 / len(y) * X.T @ (X @ w - y)

    e = rho * grad(w0) / grad(w0).norm()
    torch.testing.assert_close(seen[0], w0)
    torch.testing.assert_close(seen[1], w0 + e)
    torch.testing.assert_close(model.weight.detach().view(-1), w0 - lr * grad(w0 + e))
    assert opt.pass_counts == {"forward": 2, "forward_no_grad": 0, "backward": 2}


def test_asam_perturbation_matches_hand_computation() -> None:
    model = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -2.0, 1.0]], dtype=torch.float64))
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    seen = []

    def closure() -> torch.Tensor:
        seen.append(model.weight.detach().clone().view(-1))
        return model(x).sum()  # gradient = x

    SAM(model.parameters(), torch.optim.SGD, rho=0.1, adaptive=True, model=model, lr=0.0).step(closure)
    w, gr = seen[0], x.view(-1)
    expected = 0.1 * w.pow(2) * gr / (w.abs() * gr).norm()
    torch.testing.assert_close(seen[1] - w, expected)


@pytest.mark.parametrize(("q", "difference", "expected_no_grad"), [
    (1, "central", 2), (4, "central", 8), (1, "forward", 2), (3, "forward", 4),
])
def test_zosam_pass_counts(q: int, difference: str, expected_no_grad: int) -> None:
    model = mlp()
    opt = _zosam(model, q=q, difference=difference)
    x, y = batch(0)
    for _ in range(3):
        opt.step(make_closure(model, F.cross_entropy, x, y))
    assert opt.pass_counts == {"forward": 3, "forward_no_grad": 3 * expected_no_grad, "backward": 3}


def test_sgd_wrapper_pass_counts_and_update() -> None:
    model, ref = mlp(), mlp()
    x, y = batch(0)
    opt = FirstOrder(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.step(make_closure(model, F.cross_entropy, x, y))
        ref_opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        ref_opt.step()
    for p, r in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, r)
    assert opt.pass_counts == {"forward": 3, "forward_no_grad": 0, "backward": 3}


@pytest.mark.parametrize("name", ["base", "sam", "zosam"])
def test_masked_weights_stay_zero_and_are_never_perturbed(name: str) -> None:
    model = mlp()
    w = model[0].weight
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    opt = OPTIMIZERS.get(name)(model.parameters(), torch.optim.SGD, model=model, lr=0.1, momentum=0.9)
    opt.set_masks({w: mask})
    x, y = batch(0)
    pruned_values = []

    def closure(fraction: float = 1.0) -> torch.Tensor:
        pruned_values.append(w.detach()[~mask].abs().max().item())
        return F.cross_entropy(model(x), y)

    for _ in range(5):
        opt.step(closure)
        assert torch.all(w.detach()[~mask] == 0)
    assert max(pruned_values) == 0.0  # zero in every pass: queries, perturbed and final
    assert torch.all(w.detach()[mask] != 0)


@pytest.mark.parametrize("name", ["sam", "zosam"])
def test_batchnorm_statistics_change_only_in_final_pass(name: str) -> None:
    model = mlp(bn=True)
    bn = model[1]
    opt = OPTIMIZERS.get(name)(model.parameters(), torch.optim.SGD, model=model, lr=0.1)
    before = bn.running_mean.clone()
    after_each_pass = []
    bn.register_forward_hook(lambda m, i, o: after_each_pass.append(
        (m.running_mean.clone(), int(m.num_batches_tracked))))
    x, y = batch(0)
    opt.step(make_closure(model, F.cross_entropy, x, y))
    *earlier, final = after_each_pass
    assert len(earlier) >= 1
    for mean, tracked in earlier:
        assert torch.equal(mean, before) and tracked == 0
    assert not torch.equal(final[0], before) and final[1] == 1
    assert bn.track_running_stats  # restored after the step


def test_zosam_restores_weights_bit_exactly() -> None:
    model = mlp(bn=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = _zosam(model, q=3, mu=0.37, lr=0.0)  # a large mu makes inexact restores visible
    x, y = batch(0)
    assert opt.estimate_gradient(make_closure(model, F.cross_entropy, x, y)) is not None
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    # A full step with lr = 0: the perturbation is undone exactly before the (null) update.
    opt.step(make_closure(model, F.cross_entropy, x, y))
    for k, v in model.named_parameters():
        assert torch.equal(v, state[k]), k


def test_same_seed_same_trajectory_and_different_seed_differs() -> None:
    a, _ = train_steps(lambda m: _zosam(m, seed=7, momentum=0.9), 5)
    b, _ = train_steps(lambda m: _zosam(m, seed=7, momentum=0.9), 5)
    c, _ = train_steps(lambda m: _zosam(m, seed=8, momentum=0.9), 5)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True))


@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.AdamW])
def test_resume_equals_uninterrupted(base) -> None:
    def factory(m):
        opt = ZOSAM(m.parameters(), base, model=m, q=2, seed=3, lr=0.05)
        return opt

    (full, full_opt), (resumed, resumed_opt), _ = resumed_halfway(factory, 6)
    for p, r in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, r)
    assert resumed_opt.pass_counts == full_opt.pass_counts
    assert resumed_opt.step_count == 6


def test_lr_scheduler_attaches_to_wrapper_and_acts_on_base() -> None:
    model = mlp()
    opt = _zosam(model, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = batch(0)
    opt.step(make_closure(model, F.cross_entropy, x, y))
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_query_fraction_uses_a_prefix_of_the_batch() -> None:
    model = mlp()
    sizes = []
    x, y = batch(0, n=16)
    base = make_closure(model, F.cross_entropy, x, y)

    def closure(fraction: float = 1.0) -> torch.Tensor:
        sizes.append(max(1, math.ceil(fraction * 16)))
        return base(fraction)

    _zosam(model, query_fraction=0.25).step(closure)
    assert sizes == [4, 4, 16]
    with pytest.raises(ValueError, match=r"fraction="):
        _zosam(model, query_fraction=0.25).step(lambda: F.cross_entropy(model(x), y))


def test_zero_or_nonfinite_estimate_skips_perturbation_and_never_nans() -> None:
    model = mlp()
    opt = _zosam(model)
    x, y = batch(0)
    seen = []

    def flat(fraction: float = 1.0) -> torch.Tensor:  # constant queries -> zero estimate
        seen.append([p.detach().clone() for p in model.parameters()])
        loss = F.cross_entropy(model(x), y)
        return loss if torch.is_grad_enabled() else torch.tensor(1.0)

    w0 = [p.detach().clone() for p in model.parameters()]
    opt.step(flat)
    assert opt.skipped_perturbations == 1
    assert all(torch.equal(a, b) for a, b in zip(w0, seen[-1], strict=True))  # final pass at w

    def nan_queries(fraction: float = 1.0) -> torch.Tensor:
        loss = F.cross_entropy(model(x), y)
        return loss if torch.is_grad_enabled() else torch.tensor(float("nan"))

    opt.step(nan_queries)
    assert opt.skipped_perturbations == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bfloat16_autocast_and_grad_scaler_on_cpu() -> None:
    model = mlp()
    x, y = batch(0, n=64)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = _zosam(model, q=2, max_grad_norm=1.0, momentum=0.9)
    closure = make_closure(model, F.cross_entropy, x, y,
                           autocast=torch.autocast("cpu", dtype=torch.bfloat16))
    first = F.cross_entropy(model(x), y).item()
    for _ in range(30):
        opt.step(closure, scaler=scaler)
        scaler.update()
    assert opt.pass_counts["backward"] == 30
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert F.cross_entropy(model(x), y).item() < first


def test_gradient_clipping_bounds_the_applied_update() -> None:
    model = nn.Linear(4, 1, bias=False)
    w0 = model.weight.detach().clone()
    x = torch.full((2, 4), 100.0)
    opt = FirstOrder(model.parameters(), torch.optim.SGD, lr=1.0, max_grad_norm=0.5)
    opt.step(lambda: model(x).sum())
    assert (model.weight.detach() - w0).norm().item() == pytest.approx(0.5, rel=1e-4)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"rho": 0.0}, "rho"), ({"rho": -1.0}, "rho"), ({"mu": 0.0}, "mu"), ({"q": 0}, "q"),
    ({"q": 1.5}, "q"), ({"difference": "backward"}, "difference"),
    ({"directions": "rademacher"}, "directions"), ({"query_fraction": 0.0}, "query_fraction"),
    ({"query_fraction": 1.5}, "query_fraction"), ({"seed": -1}, "seed"),
])
def test_zosam_bad_arguments_name_the_field(kwargs: dict, field: str) -> None:
    model = mlp()
    with pytest.raises(ValueError, match=rf"^{field}="):
        ZOSAM(model.parameters(), torch.optim.SGD, model=model, lr=0.1, **kwargs)


def test_sam_bad_arguments_and_missing_model() -> None:
    model = mlp()
    with pytest.raises(ValueError, match=r"^rho="):
        SAM(model.parameters(), torch.optim.SGD, rho=0.0, model=model, lr=0.1)
    with pytest.raises(ValueError, match="base_optimizer"):
        SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    with pytest.raises(TypeError, match="model"):
        SAM(model.parameters(), torch.optim.SGD, lr=0.1)  # model= cannot be forgotten
    with pytest.raises(ValueError, match=r"allowed: .*zosam"):
        OPTIMIZERS.get("zo-sam")
