"""Correctness of the efficient-SAM peers: ESAM, LookSAM, GSAM, RWP, AsyncSAM and
MSAM."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from tiny import LeastSquares, batch, mlp
from torch import nn

from zosam.optim import (
    ESAM,
    GSAM,
    MSAM,
    OPTIMIZERS,
    RWP,
    SAM,
    ZOSAM,
    AsyncSAM,
    LookSAM,
    derive_seed,
    make_closure,
)

PEERS = ["esam", "looksam", "gsam", "rwp", "asyncsam", "msam"]


def _peer(name: str, model: nn.Module, **kw):
    kw.setdefault("lr", 0.1)
    if name == "msam":
        kw.setdefault("momentum", 0.9)  # MSAM ascends along the momentum: it needs one
    return OPTIMIZERS.get(name)(model.parameters(), torch.optim.SGD, model=model, **kw)


# -- hand computations ---------------------------------------------------------------------
def test_esam_matches_hand_computation() -> None:
    ls = LeastSquares()
    rho, beta, gamma, lr, seed = 0.05, 0.5, 0.5, 0.1, 4
    w0 = ls.w()
    opt = ls.make(ESAM, rho=rho, beta=beta, gamma=gamma, seed=seed, lr=lr)
    opt.step(ls.closure)

    g = ls.grad(w0)
    gen = torch.Generator().manual_seed(derive_seed(seed, 0, 0))
    m = (torch.rand(1, 6, generator=gen) < beta).double().view(-1)  # the documented stream
    assert 0 < m.sum() < 6  # a mask that actually drops some weights
    e = rho / beta * m * g / g.norm()
    increase = ls.per_sample(w0 + e) - ls.per_sample(w0)
    idx = torch.topk(increase, math.ceil(gamma * 8)).indices.sort().values

    (w_a, grad_a, n_a), (w_b, grad_b, n_b), (w_c, grad_c, n_c) = ls.seen
    torch.testing.assert_close(w_a, w0)
    assert grad_a and n_a == 8
    torch.testing.assert_close(w_b, w0 + e)
    assert not grad_b and n_b == 8  # the selection pass: no autograd, whole batch
    torch.testing.assert_close(w_c, w0 + e)
    assert grad_c and n_c == 4
    torch.testing.assert_close(ls.w(), w0 - lr * ls.grad(w0 + e, idx))
    assert opt.pass_counts == {"forward": 2, "forward_no_grad": 1, "backward": 2}


def test_looksam_matches_hand_computation() -> None:
    ls = LeastSquares()
    rho, k, alpha, lr = 0.05, 2, 0.7, 0.1
    opt = ls.make(LookSAM, rho=rho, k=k, alpha=alpha, lr=lr)
    w = ls.w()
    # Step 0 (SAM step): store g_v = g_s - (g.g_s / ||g||^2) g.
    g = ls.grad(w)
    e = rho * g / g.norm()
    g_s = ls.grad(w + e)
    g_v = g_s - (g @ g_s) / (g @ g) * g
    opt.step(ls.closure)
    torch.testing.assert_close(ls.seen[1][0], w + e)
    w = w - lr * g_s
    torch.testing.assert_close(ls.w(), w)
    # Step 1 (reuse): g + alpha ||g|| / ||g_v|| g_v, one pass at w.
    opt.step(ls.closure)
    torch.testing.assert_close(ls.seen[2][0], w)
    g = ls.grad(w)
    w = w - lr * (g + alpha * g.norm() / g_v.norm() * g_v)
    torch.testing.assert_close(ls.w(), w)
    # Step 2: a SAM step again.
    opt.step(ls.closure)
    g = ls.grad(w)
    e = rho * g / g.norm()
    torch.testing.assert_close(ls.seen[4][0], w + e)
    torch.testing.assert_close(ls.w(), w - lr * ls.grad(w + e))
    assert len(ls.seen) == 5
    assert opt.pass_counts == {"forward": 5, "forward_no_grad": 0, "backward": 5}


def test_gsam_matches_hand_computation_with_rho_from_the_current_lr() -> None:
    ls = LeastSquares()
    rho_max, rho_min, alpha = 0.1, 0.02, 0.3
    opt = ls.make(GSAM, rho_max=rho_max, rho_min=rho_min, alpha=alpha, lr=0.1)  # lr_max = 0.1
    for group in opt.param_groups:
        group["lr"] = 0.025  # as a scheduler would: a quarter of the way from lr_min = 0
    w0 = ls.w()
    opt.step(ls.closure)
    rho_t = rho_min + (rho_max - rho_min) * 0.25
    assert opt.rho == pytest.approx(rho_t)
    g = ls.grad(w0)
    e = rho_t * g / g.norm()
    g_p = ls.grad(w0 + e)
    g_orth = g - (g @ g_p) / (g_p @ g_p) * g_p
    torch.testing.assert_close(ls.seen[1][0], w0 + e)
    torch.testing.assert_close(ls.w(), w0 - 0.025 * (g_p - alpha * g_orth))
    assert opt.pass_counts == {"forward": 2, "forward_no_grad": 0, "backward": 2}


def test_gsam_rho_follows_an_lr_scheduler_on_the_wrapper() -> None:
    model = mlp()
    opt = GSAM(model.parameters(), torch.optim.SGD, rho_max=0.08, rho_min=0.02, model=model, lr=0.2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = batch(0)
    rhos = []
    for _ in range(3):
        opt.step(make_closure(model, F.cross_entropy, x, y))
        rhos.append(opt.rho)
        sched.step()
    # lr 0.2, 0.1, 0.05 with lr_min = 0: rho = 0.02 + 0.06 * lr / 0.2.
    assert rhos == pytest.approx([0.08, 0.05, 0.035])
    for group in opt.param_groups:
        group["lr"] = 0.5  # above lr_max (e.g. a warm-up overshoot): clamped
    assert opt.scheduled_rho() == pytest.approx(0.08)


def test_rwp_matches_hand_computation() -> None:
    ls = LeastSquares()
    rho, lr, seed = 0.05, 0.1, 11
    opt = ls.make(RWP, rho=rho, seed=seed, lr=lr)
    w0 = ls.w()
    opt.step(ls.closure)
    gen = torch.Generator().manual_seed(derive_seed(seed, 0, 0))
    u = torch.randn(1, 6, generator=gen, dtype=torch.float64).view(-1)
    e = rho * u / u.norm()
    assert len(ls.seen) == 1
    torch.testing.assert_close(ls.seen[0][0], w0 + e)
    torch.testing.assert_close(ls.w(), w0 - lr * ls.grad(w0 + e))
    assert opt.pass_counts == {"forward": 1, "forward_no_grad": 0, "backward": 1}


def test_asyncsam_matches_hand_computation() -> None:
    ls = LeastSquares()
    rho, lr = 0.05, 0.1
    opt = ls.make(AsyncSAM, rho=rho, lr=lr)
    w = ls.w()
    # Step 0: no stale gradient yet, a plain step; it keeps the gradient it applied.
    opt.step(ls.closure)
    g_prev = ls.grad(w)
    torch.testing.assert_close(ls.seen[0][0], w, rtol=0, atol=1e-15)
    w = w - lr * g_prev
    assert opt.skipped_perturbations == 1
    torch.testing.assert_close(opt.last_gradient[0].view(-1), g_prev, rtol=0, atol=1e-15)
    for i in (1, 2):  # then e = rho g_{t-1} / ||g_{t-1}||, the gradient applied at w
        opt.step(ls.closure)
        e = rho * g_prev / g_prev.norm()
        torch.testing.assert_close(ls.seen[i][0], w + e, rtol=0, atol=1e-12)
        g_prev = ls.grad(w + e)
        w = w - lr * g_prev
        torch.testing.assert_close(ls.w(), w, rtol=0, atol=1e-12)
    assert len(ls.seen) == 3 and all(grad for _, grad, _ in ls.seen)
    assert opt.pass_counts == {"forward": 3, "forward_no_grad": 0, "backward": 3}
    assert opt.skipped_perturbations == 1


def test_msam_matches_hand_computation() -> None:
    ls = LeastSquares()
    rho, lr, m, wd = 0.3, 0.1, 0.9, 0.01
    opt = ls.make(MSAM, rho=rho, lr=lr, momentum=m, weight_decay=wd)
    w = ls.w()
    opt.step(ls.closure)  # no momentum yet: a plain step
    v = ls.grad(w) + wd * w
    w = w - lr * v
    assert opt.skipped_perturbations == 1
    for i in (1, 2):  # e = -rho v / ||v||, the paper's sign; SGD's momentum v = m v + g + wd w
        opt.step(ls.closure)
        e = -rho * v / v.norm()
        torch.testing.assert_close(ls.seen[i][0], w + e, rtol=0, atol=1e-12)
        v = m * v + ls.grad(w + e) + wd * w
        w = w - lr * v
        torch.testing.assert_close(ls.w(), w, rtol=0, atol=1e-12)
    assert opt.pass_counts == {"forward": 3, "forward_no_grad": 0, "backward": 3}


def test_msam_ascends_along_adamw_first_moment() -> None:
    ls = LeastSquares()
    opt = MSAM(ls.model.parameters(), torch.optim.AdamW, rho=0.2, model=ls.model, lr=0.01)
    opt.step(ls.closure)
    w1 = ls.w()
    m = opt.base_optimizer.state[ls.model.weight]["exp_avg"].view(-1).clone()
    opt.step(ls.closure)
    torch.testing.assert_close(ls.seen[1][0], w1 - 0.2 * m / m.norm(), rtol=0, atol=1e-12)


def test_rwp_direction_is_zosam_direction_without_the_sign() -> None:
    x, y = batch(0)
    perturbations = {}
    for name, cls in (("rwp", RWP), ("zosam", ZOSAM)):
        model = mlp()
        w0 = torch.cat([p.detach().view(-1) for p in model.parameters()])
        seen = []

        def closure(fraction: float = 1.0, model=model, seen=seen) -> torch.Tensor:
            if torch.is_grad_enabled():
                seen.append(torch.cat([p.detach().view(-1) for p in model.parameters()]))
            return F.cross_entropy(model(x), y)

        cls(model.parameters(), torch.optim.SGD, model=model, seed=5, lr=0.1).step(closure)
        perturbations[name] = seen[0] - w0
    r, z = perturbations["rwp"], perturbations["zosam"]
    assert r.norm().item() == pytest.approx(0.05)
    sign = 1.0 if torch.dot(r, z) > 0 else -1.0
    torch.testing.assert_close(z, sign * r)


# -- reductions to SAM ------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "kwargs"), [
    ("esam", {"beta": 1.0, "gamma": 1.0}),
    ("looksam", {"k": 1}),
    ("gsam", {"alpha": 0.0, "rho_min": 0.05, "rho_max": 0.05}),
])
def test_peer_reduces_to_sam_bit_exactly(name: str, kwargs: dict) -> None:
    a, b = mlp(bn=True), mlp(bn=True)
    opt_a = _peer(name, a, momentum=0.9, **kwargs)
    opt_b = SAM(b.parameters(), torch.optim.SGD, rho=0.05, model=b, lr=0.1, momentum=0.9)
    for i in range(3):
        x, y = batch(i)
        opt_a.step(make_closure(a, F.cross_entropy, x, y))
        opt_b.step(make_closure(b, F.cross_entropy, x, y))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert opt_a.pass_counts == opt_b.pass_counts


# -- the shared contracts ---------------------------------------------------------------------
@pytest.mark.parametrize(("name", "kwargs", "per_run"), [
    ("esam", {}, {"forward": 8, "forward_no_grad": 4, "backward": 8}),
    ("esam", {"gamma": 1.0}, {"forward": 8, "forward_no_grad": 0, "backward": 8}),
    ("looksam", {"k": 3}, {"forward": 6, "forward_no_grad": 0, "backward": 6}),  # SAM at 0, 3
    ("gsam", {}, {"forward": 8, "forward_no_grad": 0, "backward": 8}),
    ("rwp", {}, {"forward": 4, "forward_no_grad": 0, "backward": 4}),
    ("asyncsam", {}, {"forward": 4, "forward_no_grad": 0, "backward": 4}),
    ("msam", {}, {"forward": 4, "forward_no_grad": 0, "backward": 4}),
])
def test_pass_counts(name: str, kwargs: dict, per_run: dict) -> None:
    model = mlp()
    opt = _peer(name, model, **kwargs)
    x, y = batch(0)
    for _ in range(4):
        opt.step(make_closure(model, F.cross_entropy, x, y))
    assert opt.pass_counts == per_run


@pytest.mark.parametrize("name", PEERS)
def test_masked_weights_stay_zero_and_are_never_perturbed(name: str) -> None:
    model = mlp()
    w = model[0].weight
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    opt = _peer(name, model, momentum=0.9, **({"k": 2} if name == "looksam" else {}))
    opt.set_masks({w: mask})
    x, y = batch(0)
    base = make_closure(model, F.cross_entropy, x, y)
    pruned_values = []

    def closure(fraction: float = 1.0, **kwargs) -> torch.Tensor:
        pruned_values.append(w.detach()[~mask].abs().max().item())
        return base(fraction, **kwargs)

    for _ in range(5):
        opt.step(closure)
        assert torch.all(w.detach()[~mask] == 0)
    assert len(pruned_values) >= 5
    assert max(pruned_values) == 0.0  # zero in every pass: perturbed, selection and final
    assert torch.all(w.detach()[mask] != 0)


@pytest.mark.parametrize(("name", "earlier_passes"), [
    ("esam", 2), ("looksam", 1), ("gsam", 1), ("rwp", 0), ("asyncsam", 0), ("msam", 0)])
def test_batchnorm_statistics_change_only_in_final_pass(name: str, earlier_passes: int) -> None:
    model = mlp(bn=True)
    bn = model[1]
    opt = _peer(name, model)
    before = bn.running_mean.clone()
    after_each_pass = []
    bn.register_forward_hook(lambda m, i, o: after_each_pass.append(
        (m.running_mean.clone(), int(m.num_batches_tracked))))
    x, y = batch(0)
    opt.step(make_closure(model, F.cross_entropy, x, y))
    *earlier, final = after_each_pass
    assert len(earlier) == earlier_passes
    for mean, tracked in earlier:
        assert torch.equal(mean, before) and tracked == 0
    assert not torch.equal(final[0], before) and final[1] == 1
    assert bn.track_running_stats  # restored after the step


def _schedule(opt, i: int) -> None:
    for group in opt.param_groups:  # a hand LR schedule of the step index (so GSAM's rho moves)
        group["lr"] = 0.05 * (1 - i / 8)


def _train(name: str, steps: int, model=None, opt=None, start: int = 0, **kw):
    model = model or mlp(bn=True)
    opt = opt or _peer(name, model, **kw)
    for i in range(start, start + steps):
        _schedule(opt, i)
        x, y = batch(100 + i)
        opt.step(make_closure(model, F.cross_entropy, x, y))
    return model, opt


def _params_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters(), strict=True))


PEER_KW = {"esam": {"seed": 7}, "looksam": {"k": 4}, "gsam": {"rho_min": 0.01}, "rwp": {"seed": 7},
           "asyncsam": {"rho": 0.1}, "msam": {"rho": 0.2}}


@pytest.mark.parametrize("name", PEERS)
def test_same_seed_same_trajectory(name: str) -> None:
    a, _ = _train(name, 4, momentum=0.9, **PEER_KW[name])
    b, _ = _train(name, 4, momentum=0.9, **PEER_KW[name])
    assert _params_equal(a, b)


@pytest.mark.parametrize("name", ["esam", "rwp"])
def test_different_seed_differs(name: str) -> None:
    a, _ = _train(name, 3, seed=7)
    c, _ = _train(name, 3, seed=8)
    assert not _params_equal(a, c)


@pytest.mark.parametrize("name", PEERS)
def test_resume_equals_uninterrupted(name: str) -> None:
    kw = dict(momentum=0.9, **PEER_KW[name])
    full, full_opt = _train(name, 6, **kw)
    half, half_opt = _train(name, 3, **kw)  # LookSAM (k=4): steps 3 reuses step 0's g_v
    buf = io.BytesIO()
    torch.save({"model": half.state_dict(), "opt": half_opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = mlp(seed=99, bn=True)
    resumed.load_state_dict(ckpt["model"])
    # A different constructor lr: everything the step needs must come from the checkpoint.
    resumed_opt = _peer(name, resumed, **{**kw, "lr": 0.3})
    resumed_opt.load_state_dict(ckpt["opt"])
    _train(name, 3, resumed, resumed_opt, start=3)
    assert _params_equal(full, resumed)
    assert resumed_opt.pass_counts == full_opt.pass_counts
    assert resumed_opt.step_count == 6
    if name == "looksam":
        assert all(isinstance(v, torch.Tensor) for v in ckpt["opt"]["wrapper"]["orthogonal"])
    if name == "asyncsam":  # the stale gradient travels in the checkpoint ...
        assert all(isinstance(v, torch.Tensor) for v in ckpt["opt"]["wrapper"]["last_gradient"])
        # ... and is needed: without it the resumed run takes a plain step and diverges from the full one.
        del ckpt["opt"]["wrapper"]["last_gradient"]
        again = mlp(seed=99, bn=True)
        again.load_state_dict(ckpt["model"])
        again_opt = _peer(name, again, **kw)
        again_opt.load_state_dict(ckpt["opt"])
        _train(name, 3, again, again_opt, start=3)
        assert not _params_equal(full, again)


@pytest.mark.parametrize("name", PEERS)
def test_grad_scaler_and_bfloat16_autocast_on_cpu(name: str) -> None:
    model = mlp()
    x, y = batch(0, n=64)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = _peer(name, model, max_grad_norm=1.0, momentum=0.9)
    closure = make_closure(model, F.cross_entropy, x, y, autocast=torch.autocast("cpu", dtype=torch.bfloat16))
    first = F.cross_entropy(model(x), y).item()
    for _ in range(12):
        opt.step(closure, scaler=scaler)
        scaler.update()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert F.cross_entropy(model(x), y).item() < first


# -- closures -----------------------------------------------------------------------------------
def test_make_closure_indices_and_per_sample_losses() -> None:
    model = mlp()
    x, y = batch(0)
    closure = make_closure(model, F.cross_entropy, x, y)
    idx = torch.tensor([1, 4, 9])
    per_sample = closure(reduction="none")
    assert per_sample.shape == (16,)
    torch.testing.assert_close(per_sample.mean(), closure())
    torch.testing.assert_close(closure(indices=idx), per_sample[idx].mean())
    torch.testing.assert_close(closure(indices=idx, reduction="none"), per_sample[idx])
    with pytest.raises(ValueError, match=r"^reduction="):
        closure(reduction="sum")
    with pytest.raises(ValueError, match="not both"):
        closure(0.5, indices=idx)


def test_esam_data_selection_needs_a_per_sample_closure() -> None:
    model = mlp()
    x, y = batch(0)
    opt = _peer("esam", model)
    with pytest.raises(ValueError, match=r"gamma < 1 needs a closure that accepts `reduction=` and `indices=`"):
        opt.step(lambda: F.cross_entropy(model(x), y))
    with pytest.raises(ValueError, match="one loss per sample"):
        opt.step(lambda fraction=1.0, **kw: F.cross_entropy(model(x), y))
    # gamma = 1 selects nothing, so any closure will do.
    _peer("esam", model, gamma=1.0).step(lambda: F.cross_entropy(model(x), y))


@pytest.mark.parametrize(("name", "kwargs", "field"), [
    ("esam", {"rho": 0.0}, "rho"), ("esam", {"beta": 0.0}, "beta"), ("esam", {"beta": 1.5}, "beta"),
    ("esam", {"gamma": 0.0}, "gamma"), ("esam", {"gamma": 1.1}, "gamma"), ("esam", {"seed": -1}, "seed"),
    ("esam", {"seed": 1.5}, "seed"),
    ("looksam", {"rho": -0.1}, "rho"), ("looksam", {"k": 0}, "k"), ("looksam", {"k": 2.5}, "k"),
    ("looksam", {"alpha": -0.1}, "alpha"), ("looksam", {"alpha": float("nan")}, "alpha"),
    ("gsam", {"rho_max": 0.0}, "rho_max"), ("gsam", {"rho_min": -0.01}, "rho_min"),
    ("gsam", {"rho_min": 0.2}, "rho_min"), ("gsam", {"alpha": 1.5}, "alpha"),
    ("gsam", {"alpha": -0.5}, "alpha"), ("gsam", {"lr_min": -1.0}, "lr_min"),
    ("gsam", {"lr_min": 0.2}, "lr_max"),  # default lr_max = lr = 0.1 < lr_min
    ("gsam", {"lr_max": 0.01, "lr_min": 0.02}, "lr_max"),
    ("rwp", {"rho": 0.0}, "rho"), ("rwp", {"rho": float("inf")}, "rho"), ("rwp", {"seed": -3}, "seed"),
    ("rwp", {"max_grad_norm": 0.0}, "max_grad_norm"),
    ("asyncsam", {"rho": 0.0}, "rho"), ("msam", {"rho": -0.3}, "rho"), ("msam", {"momentum": 0.0}, "momentum"),
])
def test_bad_arguments_name_the_field(name: str, kwargs: dict, field: str) -> None:
    model = mlp()
    with pytest.raises(ValueError, match=rf"^{field}="):
        _peer(name, model, **kwargs)


@pytest.mark.parametrize("name", PEERS)
def test_model_keyword_is_required(name: str) -> None:
    model = mlp()
    with pytest.raises(TypeError, match="model"):
        OPTIMIZERS.get(name)(model.parameters(), torch.optim.SGD, lr=0.1)
