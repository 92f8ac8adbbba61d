"""The flatness benchmark: label noise in the data config, its curvature and variance
measures against independent computations, its aggregation and decision by hand, and one
tiny run end to end (real digits, real optimizers, real MLflow)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zosam.bench import flatness
from zosam.config import RunConfig
from zosam.data import DataConfig, load_dataset, noisy_labels
from zosam.tracking import flatten

pytestmark = pytest.mark.usefixtures("one_thread")


# -- label noise ------------------------------------------------------------------------------------
@pytest.mark.parametrize("rate", [0.2, 0.4, 0.6])
def test_label_noise_rate_is_exact_and_test_labels_untouched(rate: float) -> None:
    clean = load_dataset(DataConfig(name="digits", image_size=8))
    noisy = load_dataset(DataConfig(name="digits", image_size=8, label_noise=rate, label_noise_seed=3))
    flipped = noisy.train.labels != clean.train.labels
    assert int(flipped.sum()) == round(rate * len(clean.train)) == noisy.meta["label_noise_flipped"]
    assert torch.equal(noisy.test.labels, clean.test.labels) and torch.equal(noisy.test.images, clean.test.images)
    assert torch.equal(noisy.train.images, clean.train.images)
    # symmetric: the new classes of the flipped samples spread over all ten classes
    assert noisy.train.labels[flipped].bincount(minlength=10).min() > 0


def test_label_noise_is_seeded_and_applied_after_the_subset() -> None:
    labels = torch.arange(10).repeat(50)
    a, b, c = (noisy_labels(labels, 0.3, s, 10) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.get_rng_state()
    noisy_labels(labels, 0.3, 5, 10)
    assert torch.equal(g, torch.get_rng_state())  # a dedicated generator: the global RNG is untouched
    sub = load_dataset(DataConfig(name="digits", image_size=8, train_subset=100, label_noise=0.4))
    sub_clean = load_dataset(DataConfig(name="digits", image_size=8, train_subset=100))
    assert int((sub.train.labels != sub_clean.train.labels).sum()) == 40


@pytest.mark.parametrize(("kw", "field"), [({"label_noise": 1.0}, "data.label_noise"),
                                          ({"label_noise": -0.1}, "data.label_noise"),
                                          ({"label_noise_seed": -1}, "data.label_noise_seed")])
def test_label_noise_is_validated(kw: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RunConfig.from_dict({"data": {"name": "digits", **kw}, "model": {"name": "mlp"}})


def test_label_noise_is_a_logged_param() -> None:
    cfg = RunConfig.from_dict({"data": {"name": "digits", "label_noise": 0.4, "label_noise_seed": 7},
                               "model": {"name": "mlp"}})
    params = flatten(cfg.to_dict())
    assert params["data.label_noise"] == "0.4" and params["data.label_noise_seed"] == "7"


# -- measures against independent computations ---------------------------------------------------------
def _tiny(seed: int = 0) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(24, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=g)
    return model, [(x[:10], y[:10]), (x[10:], y[10:])]


def _full_hessian(model: nn.Module, batches, mask: torch.Tensor | None = None) -> torch.Tensor:
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    flat0 = torch.cat([p.detach().flatten() for p in params])
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])

    def loss(flat: torch.Tensor) -> torch.Tensor:
        out, i = x, 0
        ws = []
        for s in shapes:
            n = math.prod(s)
            ws.append(flat[i:i + n].view(s))
            i += n
        out = torch.tanh(out @ ws[0].T + ws[1]) @ ws[2].T + ws[3]
        return F.cross_entropy(out, y)

    h = torch.autograd.functional.hessian(loss, flat0)
    if mask is not None:
        h = h * mask[:, None] * mask[None, :]
    return h


@pytest.mark.parametrize("masked", [False, True])
def test_power_iteration_matches_the_full_hessian(masked: bool) -> None:
    model, batches = _tiny()
    params = list(model.parameters())
    masks = None
    flat_mask = None
    if masked:
        g = torch.Generator().manual_seed(1)
        masks = [(torch.rand(p.shape, generator=g) < 0.6).double() for p in params]
        flat_mask = torch.cat([m.flatten() for m in masks])
    eig = torch.linalg.eigvalsh(_full_hessian(model, batches, flat_mask))
    got = flatness.top_hessian_eigenvalue(model, F.cross_entropy, batches, params=params, masks=masks,
                                          iters=500, tol=1e-10)
    assert got == pytest.approx(float(eig.max()), rel=1e-5)


def test_power_iteration_finds_the_largest_eigenvalue_past_a_negative_one() -> None:
    # A quadratic loss 0.5 w^T A w with eigenvalues {-5, 2, 1}: the largest is 2, not -5.
    a = torch.diag(torch.tensor([-5.0, 2.0, 1.0], dtype=torch.float64))
    q = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    a = q @ a @ q.T
    model = nn.Linear(3, 1, bias=False).double()
    batches = [(torch.zeros(1, 3, dtype=torch.float64), torch.zeros(1))]

    def loss_fn(out, y):
        w = model.weight.view(-1)
        return 0.5 * w @ a @ w + 0 * out.sum()

    got = flatness.top_hessian_eigenvalue(model, loss_fn, batches, iters=2000, tol=1e-12)
    assert got == pytest.approx(2.0, rel=1e-4)


def test_sam_gap_and_gradient_variance_by_hand() -> None:
    # Least squares with a linear model: gradients in closed form, 2/n X^T (X w - y).
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(5, 1, bias=False).double()
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = torch.randn(40, generator=g, dtype=torch.float64)
    batches = [(x[i:i + 10], y[i:i + 10]) for i in range(0, 40, 10)]

    def loss_fn(out, t):
        return ((out.squeeze(1) - t) ** 2).mean()

    w = model.weight.detach().view(-1).clone()
    grad = 2 / 40 * x.T @ (x @ w - y)
    e = 0.2 * grad / grad.norm()
    want_gap = float(((x @ (w + e) - y) ** 2).mean() - ((x @ w - y) ** 2).mean())
    assert flatness.sam_gap(model, loss_fn, batches, 0.2) == pytest.approx(want_gap, rel=1e-10)
    assert torch.equal(model.weight.detach().view(-1), w)  # the weights are restored exactly

    gs = torch.stack([2 / 10 * xb.T @ (xb @ w - yb) for xb, yb in batches])
    want_var = float(((gs - gs.mean(0)) ** 2).sum() / 3)
    assert flatness.gradient_variance(model, loss_fn, batches) == pytest.approx(want_var, rel=1e-10)
    mask = [torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0]], dtype=torch.float64)]
    gm = gs * mask[0]
    want_masked = float(((gm - gm.mean(0)) ** 2).sum() / 3)
    assert flatness.gradient_variance(model, loss_fn, batches, masks=mask) == pytest.approx(want_masked, rel=1e-10)


# -- aggregation and the decision by hand -----------------------------------------------------------
def _rec(method: str, acc: float, seed: int, *, rho=None, noise=0.4, setting="digits", bwd=1.0, s=0.01, var=1.0):
    return {"setting": setting, "noise": noise, "method": method, "rho": rho, "seed": seed, "status": "finished",
            "test_acc": acc, "train_acc_noisy": 0.9, "memorised": 0.5, "top_eig": 2.0, "sam_gap": 0.01,
            "grad_var": {"5": 9.0, "10": var}, "fwd_per_step": 1.0, "nograd_per_step": 0.0, "bwd_per_step": bwd,
            "s_per_step": s}


def test_aggregate_and_decide_by_hand() -> None:
    sgd = [0.70, 0.72, 0.74, 0.71, 0.73]
    sam = [0.94, 0.93, 0.95, 0.94, 0.94]
    sam_small = [0.80] * 5
    guided = [0.91, 0.90, 0.92, 0.89, 0.93]
    recs = ([_rec("sgd", a, i, var=2.0) for i, a in enumerate(sgd)]
            + [_rec("sam", a, i, rho=0.3, bwd=2.0, s=0.02) for i, a in enumerate(sam)]
            + [_rec("sam", a, i, rho=0.1, bwd=2.0, s=0.02) for i, a in enumerate(sam_small)]
            + [_rec(flatness.GUIDED, a, i, rho=0.3, s=0.015, var=0.5) for i, a in enumerate(guided)]
            + [_rec("sgd", a, i, noise=0.0) for i, a in enumerate([0.97, 0.98])]
            + [_rec("sam", a, i, noise=0.0, rho=0.3) for i, a in enumerate([0.975, 0.97])])
    rows = flatness.aggregate(recs)
    row = {(r["noise"], r["method"], r["rho"]): r for r in rows}
    s = row[(0.4, "sgd", "")]
    accs = [100 * a for a in sgd]
    assert s["acc_mean"] == pytest.approx(statistics.fmean(accs))
    assert s["acc_std"] == pytest.approx(statistics.stdev(accs))
    assert s["acc_ci95"] == pytest.approx(2.7764451 * statistics.stdev(accs) / math.sqrt(5), rel=1e-6)
    g = row[(0.4, flatness.GUIDED, 0.3)]
    assert g["gain"] == pytest.approx(91.0 - 72.0)
    assert g["grad_var"] == 0.5 and g["grad_var_vs_sgd"] == pytest.approx(0.25)  # the last checkpoint
    assert g["s_step_vs_sgd"] == pytest.approx(1.5) and row[(0.4, "sam", 0.3)]["bwd_step"] == 2.0

    dec = {d["noise"]: d for d in flatness.decide(rows, judge=flatness.GUIDED, targets={"digits": 0.8})}
    d = dec[0.4]
    assert d["sam_rho"] == 0.3 and d["sam_gain"] == pytest.approx(94.0 - 72.0)  # SAM at its best rho
    assert d["decisive"] is True
    assert d[f"frac.{flatness.GUIDED}"] == pytest.approx(19.0 / 22.0)
    assert d["judge_pass"] is True  # 0.864 >= 0.8 at one backward pass per step
    assert dec[0.0]["decisive"] is False and dec[0.0]["judge_pass"] == ""  # SAM gains ~nothing
    strict = {d["noise"]: d for d in flatness.decide(rows, targets={"digits": 0.9})}
    assert strict[0.4]["judge_pass"] is False


def test_grid_maps_the_radius_and_keeps_fixed_ones() -> None:
    plan = {"digits": {"noise": [0.0, 0.4], "methods": ["sgd", "sam", "gsam", "zosam:q=2,rho=0.5"],
                       "rho": [0.1, 0.3]}}
    jobs = flatness.grid(plan, seeds=2, overrides=["epochs=3"])
    assert len(jobs) == 2 * 2 * (1 + 2 + 2 + 1)
    gsam = next(j for j in jobs if j["method"] == "gsam" and j["rho"] == 0.3)
    assert gsam["config"]["optimizer"]["rho_max"] == 0.3 and "rho" not in gsam["config"]["optimizer"]
    zo = [j for j in jobs if j["method"] == "zosam:q=2"]
    assert {j["rho"] for j in zo} == {0.5} and all(j["config"]["optimizer"]["q"] == 2 for j in zo)
    j = jobs[0]
    assert j["config"]["epochs"] == 3 and j["config"]["eval"] == {"every": 3}
    assert j["config"]["data"]["label_noise_seed"] == j["seed"]
    for j in jobs:
        RunConfig.from_dict(j["config"])
    with pytest.raises(ValueError, match="unknown_optimizer"):
        flatness.grid({"digits": {**plan["digits"], "methods": ["unknown_optimizer"]}}, seeds=1)


def test_bad_flags_are_named_before_any_run(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--settings"):
        flatness.main(["--settings", "mnist", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--noise"):
        flatness.main(["--noise", "1.5", "--out", str(tmp_path)])
    assert not (tmp_path / "runs").exists()


# -- end to end ----------------------------------------------------------------------------------------
def test_end_to_end_on_digits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "flat"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["--settings", "digits", "--noise", "0", "0.4", "--seeds", "2", "--methods", "sgd", "sam", "zosam",
            "--rho", "0.3", "--set", "epochs=2", "--jobs", "1", "--hessian-samples", "64", "--hessian-iters", "5",
            "--variance-batches", "3", "--variance-at", "0.5", "1", "--judge", "zosam", "--out", str(out),
            "--tracking-uri", uri]
    result = flatness.main(argv)
    printed = capsys.readouterr().out
    assert "fraction of SAM's gain closed" in printed and "zosam: meets its target on" in printed
    data = json.loads((out / flatness.RESULTS_FILE).read_text())
    recs = data["records"]
    assert len(recs) == 2 * 2 * 3 and all(r["status"] == "finished" for r in recs)
    for r in recs:
        assert math.isfinite(r["top_eig"]) and r["top_eig"] > 0 and math.isfinite(r["sam_gap"])
        assert set(r["grad_var"]) == {"1", "2"} and all(v > 0 for v in r["grad_var"].values())
        want_bwd = 2.0 if r["method"] == "sam" else 1.0
        assert r["bwd_per_step"] == want_bwd
        assert r["nograd_per_step"] == (2.0 if r["method"] == "zosam" else 0.0)
        if r["noise"] == 0.4:
            # memorised = (flipped samples fitted to their noisy label) / flipped: a whole count over it
            assert r["flipped"] == round(0.4 * 1438)
            count = r["memorised"] * r["flipped"]
            assert 0 <= count <= r["flipped"] and abs(count - round(count)) < 1e-6
        else:
            assert r["flipped"] == 0 and r["memorised"] is None
    assert len(result["decision"]) == 2
    for f in ("flatness_table.md", "flatness_table.csv", "flatness_decision.md", "flatness_gain_vs_cost.png",
              "flatness_acc_vs_eigenvalue.png"):
        assert (out / f).stat().st_size > 0
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("zosam-benchmarks")
    run = client.search_runs([exp.experiment_id], "tags.`zosam.benchmark` = 'flatness'")[0]
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"flatness_table.csv", "flatness_gain_vs_cost.png", "flatness.json"} <= names

    # A second call retrains nothing: every run is reused from --out.
    again = flatness.main(argv[:-2])
    assert "(12 reused)" in capsys.readouterr().out
    assert again["rows"] == result["rows"]
    # --report-only trains nothing: a method never run stays missing.
    report = flatness.main([*argv[:-2], "--methods", "sgd", "sam", "zosam", "rwp", "--report-only"])
    assert "12 of 16 runs recorded" in capsys.readouterr().out
    assert report["runs"] == 12 and report["planned_runs"] == 16
    assert not any(r["method"] == "rwp" for r in report["rows"])
