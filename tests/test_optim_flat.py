"""Flat parameter storage, the samplers' random stream (statistics and exact arithmetic from
the same flat draw) and steps without host synchronisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import batch, mlp
from torch import nn

from zosam.optim import OPTIMIZERS, RWP, ZOSAM, Bernoulli, Gaussian, Sphere, derive_seed, make_closure
from zosam.optim.guided import GuidedDirections

pytestmark = pytest.mark.usefixtures("one_thread")


class TwoTensors(nn.Module):
    """L(w) = 0.5 w^T A w + b^T w over w = (W (2 x 3), v (4)) in float64: a quadratic whose
    weights span two parameter tensors, so the flat layout matters."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        m = torch.randn(10, 10, generator=g, dtype=torch.float64)
        self.register_buffer("A", m @ m.T / 10 + torch.eye(10, dtype=torch.float64))
        self.register_buffer("b", torch.randn(10, generator=g, dtype=torch.float64))
        self.W = nn.Parameter(torch.randn(2, 3, generator=g, dtype=torch.float64))
        self.v = nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64))

    def w(self) -> torch.Tensor:
        return torch.cat([self.W.view(-1), self.v])

    def f(self, w: torch.Tensor) -> torch.Tensor:
        return 0.5 * w @ self.A @ w + self.b @ w

    def loss(self, fraction: float = 1.0) -> torch.Tensor:
        return self.f(self.w())

    def grad(self, w: torch.Tensor) -> torch.Tensor:
        return self.A @ w + self.b


def _flat_draw(seed: int, d: int = 10) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- flat storage ---------------------------------------------------------------------------------
def test_parameters_are_views_of_one_buffer_and_stay_so() -> None:
    model = mlp(bn=True)
    before = [p.detach().clone() for p in model.parameters()]
    opt = ZOSAM(model.parameters(), torch.optim.SGD, model=model, lr=0.1, momentum=0.9)
    (flat,) = opt.flat.flats
    assert flat.numel() == sum(p.numel() for p in model.parameters())
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)  # values kept
        assert p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    x, y = batch(0)
    opt.step(make_closure(model, F.cross_entropy, x, y))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)  # copies in place: the views survive a checkpoint load
    opt.step(make_closure(model, F.cross_entropy, x, y))
    with torch.no_grad():
        flat.zero_()
    assert all(torch.all(p == 0) for p in model.parameters())  # writing the buffer writes the model


def test_replaced_storage_is_detected_and_rebuild_restores_the_views() -> None:
    model = mlp()
    opt = ZOSAM(model.parameters(), torch.optim.SGD, model=model, lr=0.1)
    model.double()  # replaces p.data after the optimizer was built
    x, y = batch(0)
    closure = make_closure(model, F.cross_entropy, x.double(), y)
    with pytest.raises(RuntimeError, match="no longer aliases"):
        opt.step(closure)
    opt.flat.rebuild()
    opt.step(closure)
    assert opt.flat.flats[0].dtype == torch.float64


# -- the random stream: statistics ---------------------------------------------------------------
def _draws(sampler, n: int, d: int = 6, mask: list[torch.Tensor] | None = None) -> torch.Tensor:
    out = [torch.empty(d, dtype=torch.float64)]
    return torch.stack([sampler.draw(out, derive_seed(5, i, 0), mask)[0].clone() for i in range(n)])


@pytest.mark.parametrize("kind", ["gaussian", "sphere"])
def test_isotropic_directions_have_zero_mean_and_identity_covariance(kind: str) -> None:
    # N = 6000 draws, d = 6: standard errors 0.013 (mean) and about 0.02 (covariance).
    sampler = Gaussian() if kind == "gaussian" else Sphere()
    sampler.active = 6  # type: ignore[attr-defined]
    u = _draws(sampler, 6000)
    assert u.mean(0).abs().max() < 0.06
    cov = u.T @ u / len(u)
    assert (cov - torch.eye(6, dtype=torch.float64)).abs().max() < 0.1
    if kind == "sphere":
        torch.testing.assert_close(u.norm(dim=1), torch.full((6000,), 6**0.5, dtype=torch.float64))


def test_masked_directions_are_zero_off_the_mask() -> None:
    mask = [torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64)]
    u = _draws(Gaussian(), 2000, mask=mask)
    assert torch.all(u[:, mask[0] == 0] == 0)
    cov = u[:, mask[0] == 1].T @ u[:, mask[0] == 1] / len(u)
    assert (cov - torch.eye(4, dtype=torch.float64)).abs().max() < 0.12


def test_bernoulli_masks_have_mean_beta_and_independent_entries() -> None:
    m = _draws(Bernoulli(0.6), 6000)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert (m.mean(0) - 0.6).abs().max() < 0.04
    cov = (m - 0.6).T @ (m - 0.6) / len(m)
    assert (cov - 0.24 * torch.eye(6, dtype=torch.float64)).abs().max() < 0.04


def test_guided_directions_have_the_documented_covariance() -> None:
    # E[u u^T] = alpha I + (1 - alpha) (d / k) U U^T with U the normalised surrogate (k = 1).
    d, alpha = 6, 0.5
    s = torch.tensor([1.0, 2.0, 0.0, -1.0, 0.5, 0.0], dtype=torch.float64)
    guided = GuidedDirections(alpha)
    guided.fit([[s]], None, d)
    assert guided.k == 1
    u = _draws(guided, 8000)
    uhat = s / s.norm()
    expected = alpha * torch.eye(d, dtype=torch.float64) + (1 - alpha) * d * torch.outer(uhat, uhat)
    assert u.mean(0).abs().max() < 0.08
    assert (u.T @ u / len(u) - expected).abs().max() < 0.15


def test_zosam_estimate_is_unbiased_across_tensors() -> None:
    # Central differences are exact on a quadratic, so E[g_hat] = grad; N = 3000, d = 10:
    # relative RMS error of the mean about sqrt((d + 1) / N) = 0.06.
    model = TwoTensors()
    opt = ZOSAM(model.parameters(), torch.optim.SGD, model=None, lr=0.0, mu=1e-3, seed=2)
    est = []
    for i in range(3000):
        opt.step_count = i
        est.append(torch.cat([t.view(-1) for t in opt.estimate_gradient(model.loss)]))
    g = model.grad(model.w().detach())
    rel = (torch.stack(est).mean(0) - g).norm() / g.norm()
    assert rel < 0.2, rel


# -- the random stream: exact arithmetic from the same flat draw ----------------------------------
def test_zosam_step_equals_the_reference_built_from_the_flat_draw() -> None:
    model = TwoTensors()
    rho, mu, lr, q, seed = 0.05, 1e-3, 0.1, 3, 9
    w0 = model.w().detach().clone()
    seen = []

    def closure(fraction: float = 1.0) -> torch.Tensor:
        seen.append(model.w().detach().clone())
        return model.loss()

    opt = ZOSAM(model.parameters(), torch.optim.SGD, model=None, rho=rho, mu=mu, q=q, seed=seed, lr=lr)
    opt.step(closure)
    g_hat = torch.zeros(10, dtype=torch.float64)
    for i in range(q):
        u = _flat_draw(derive_seed(seed, 0, i))  # W's 6 entries, then v's 4
        torch.testing.assert_close(seen[2 * i], w0 + mu * u, rtol=0, atol=1e-15)
        torch.testing.assert_close(seen[2 * i + 1], w0 - mu * u, rtol=0, atol=1e-15)
        g_hat += (model.f(w0 + mu * u) - model.f(w0 - mu * u)) / (2 * mu) * u / q
    e = rho * g_hat / g_hat.norm()
    torch.testing.assert_close(seen[-1], w0 + e, rtol=0, atol=1e-12)
    torch.testing.assert_close(model.w().detach(), w0 - lr * model.grad(w0 + e), rtol=0, atol=1e-12)


def test_rwp_step_equals_the_reference_built_from_the_flat_draw() -> None:
    model = TwoTensors()
    w0 = model.w().detach().clone()
    opt = RWP(model.parameters(), torch.optim.SGD, model=None, rho=0.05, seed=11, lr=0.1)
    opt.step(model.loss)
    u = _flat_draw(derive_seed(11, 0, 0))
    e = 0.05 * u / u.norm()
    torch.testing.assert_close(model.w().detach(), w0 - 0.1 * model.grad(w0 + e), rtol=0, atol=1e-12)


# -- no host synchronisation inside a step --------------------------------------------------------
def _syncs(opt, closure, steps: int = 3) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            opt.step(closure)
    return sum(ev.name == "aten::_local_scalar_dense" for ev in prof.events())


@pytest.mark.parametrize("spec", ["base", "sam", "zosam", "zosam:directions=sphere", "zosam:directions=guided",
                                  "zosam:difference=forward", "rwp", "looksam:k=2", "gsam", "asyncsam", "msam",
                                  "esam:gamma=1.0"])
def test_a_step_reads_nothing_back_to_the_host(spec: str) -> None:
    name, _, arg = spec.partition(":")
    kwargs = {k: (v if not v.replace(".", "").isdigit() else float(v) if "." in v else int(v))
              for k, v in (a.split("=") for a in arg.split(",") if a)}
    model = mlp(bn=True)
    opt = OPTIMIZERS.get(name)(model.parameters(), torch.optim.SGD, model=model, lr=0.1, momentum=0.9,
                               max_grad_norm=1.0, **kwargs)
    w = model[0].weight
    opt.set_masks({w: torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) > 0.5})
    x, y = batch(0)
    closure = make_closure(model, F.cross_entropy, x, y)
    opt.step(closure)  # the first step of a guided run, AsyncSAM and MSAM has nothing stored yet
    assert _syncs(opt, closure) == 0


# -- compile: graphs (CPU: the eager fallback; the capture itself needs a CUDA device) ------------
def test_graphs_mode_on_cpu_runs_eagerly_says_so_and_matches_eager(caplog) -> None:
    x, y = batch(0)
    runs = []
    for mode in ("none", "graphs"):
        model = mlp()
        with caplog.at_level("INFO", logger="zosam.optim.graphs"):
            opt = ZOSAM(model.parameters(), torch.optim.SGD, model=model, q=2, seed=4, lr=0.1, compile=mode)
            for _ in range(2):
                opt.step(make_closure(model, F.cross_entropy, x, y))
        runs.append([p.detach().clone() for p in model.parameters()])
        assert opt.pass_counts["forward_no_grad"] == 8
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    assert "ignored on cpu" in caplog.text


def test_compile_mode_is_validated() -> None:
    from zosam.config import load_config
    from zosam.validate import ConfigError

    model = mlp()
    with pytest.raises(ValueError, match=r"^compile=.*allowed"):
        ZOSAM(model.parameters(), torch.optim.SGD, model=model, lr=0.1, compile="jit")
    assert load_config(None, ["optimizer.name=zosam", "optimizer.compile=graphs"]).optimizer.compile == "graphs"
    with pytest.raises(ConfigError, match=r"optimizer\.compile='jit' is invalid"):
        load_config(None, ["optimizer.name=zosam", "optimizer.compile=jit"])


@pytest.mark.parametrize(("base_kwargs", "most"), [({}, 0), ({"foreach": True}, 1)])
def test_with_a_grad_scaler_only_the_scalers_own_sync_remains(base_kwargs: dict, most: int) -> None:
    # The default fused base step takes found_inf on the device; a foreach step makes
    # scaler.step read it back once.
    model = mlp(bn=True)
    opt = ZOSAM(model.parameters(), torch.optim.SGD, model=model, lr=0.1, momentum=0.9, max_grad_norm=1.0,
                **base_kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = batch(0)
    closure = make_closure(model, F.cross_entropy, x, y, autocast=torch.autocast("cpu", dtype=torch.bfloat16))

    def step(closure=closure) -> None:
        opt.step(closure, scaler=scaler)
        scaler.update()

    step()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    assert sum(ev.name == "aten::_local_scalar_dense" for ev in prof.events()) == 3 * most
