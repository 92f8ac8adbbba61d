"""Every registered optimizer through `zosam train` (configs/digits.yaml, a RigL host), and the
engine's train accuracy for optimizers whose passes carry keyword arguments."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from zosam.cli import main
from zosam.config import load_config
from zosam.engine import CHECKPOINT_FILE, Trainer
from zosam.optim import OPTIMIZERS

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["epochs=1", "max_steps_per_epoch=3", "data.image_size=8", "data.train_subset=192", "data.test_subset=64",
         "data.batch_size=32", "model.width=8", "tracking.enabled=false", "eval.diagnostics_steps=1"]
HYPER = {  # each optimizer's own hyperparameters, through the config's constructor-signature check
    "base": {}, "sam": {"rho": 0.05}, "zosam": {"rho": 0.05, "q": 1, "directions": "guided", "alpha": 0.1,
                                                "guide": "gradient+momentum"},
    "esam": {"beta": 0.6, "gamma": 0.5}, "looksam": {"k": 2, "alpha": 0.7}, "gsam": {"alpha": 0.1},
    "rwp": {"rho": 0.05}, "asyncsam": {"rho": 0.1}, "msam": {"rho": 0.3},
}


def test_every_registered_optimizer_is_covered() -> None:
    assert set(OPTIMIZERS.names()) == set(HYPER)


@pytest.mark.parametrize("name", sorted(HYPER))
def test_zosam_train_runs_every_optimizer_and_reports_train_accuracy(name: str, tmp_path: Path) -> None:
    opt = {"name": name, "base": "sgd", "lr": 0.1, "momentum": 0.9, **HYPER[name]}
    override = "optimizer=" + yaml.safe_dump(opt, default_flow_style=True).strip()
    code = main(["train", "--config", str(ROOT / "configs" / "digits.yaml"), override, *SMALL,
                 "--checkpoint-dir", str(tmp_path)])
    assert code == 0
    ckpt = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert ckpt["config"]["optimizer"] == {**opt, "weight_decay": 5e-4}  # the config default
    (epoch,) = ckpt["history"]
    # 3 steps of 32 samples: the accuracy is a count of correct predictions over 96, and zero
    # correct predictions would mean nothing was recorded.
    correct = epoch["train_acc"] * 96
    assert correct == pytest.approx(round(correct)) and round(correct) >= 1
    assert (epoch["diagnostics"] != {}) == (name == "zosam")


def test_esam_train_accuracy_is_that_of_its_whole_batch_pass() -> None:
    """ESAM (gamma < 1) runs all its passes with keyword arguments (per-sample losses, a
    subset); the engine records the accuracy of its pass over the whole batch at w."""
    cfg = load_config(ROOT / "configs" / "digits.yaml",
                      [*SMALL, "sparse.method=dense", "optimizer={name: esam, lr: 0.1, gamma: 0.5}"])
    trainer = Trainer(cfg, log=None)
    x, y = next(iter(trainer.train_loader))
    with torch.no_grad():
        expected = float((trainer.model(x).argmax(1) == y).sum())  # the first pass runs at w
    stats: dict[str, float] = {}
    trainer.optimizer.step(trainer._closure(x, y, stats))
    assert stats["correct"] == expected


def test_zo_cosine_diagnostic_compares_active_weights_with_active_weights() -> None:
    cfg = load_config(ROOT / "configs" / "digits.yaml", [*SMALL, "optimizer.q=4"])  # ZO-SAM on RigL at 50 %
    trainer = Trainer(cfg, log=None)
    trainer.init_masks()
    opt = trainer.optimizer
    assert opt.masks
    x, y = next(iter(trainer.train_loader))
    reported = trainer.diagnostics(x, y)["diag_cosine"]
    closure = trainer._closure(x, y, {})
    g_hat = torch.cat([g.reshape(-1) for g in opt.estimate_gradient(closure)])  # the same draw again
    params = opt.params()
    grads = torch.autograd.grad(closure(), params)
    dense = torch.cat([g.reshape(-1) for g in grads])
    active = torch.cat([(g * opt.masks[p] if p in opt.masks else g).reshape(-1)
                        for p, g in zip(params, grads, strict=True)])
    cos = torch.nn.functional.cosine_similarity
    assert reported == pytest.approx(float(cos(g_hat, active, dim=0)), abs=1e-6)
    assert abs(reported - float(cos(g_hat, dense, dim=0))) > 1e-3  # the dense gradient would differ
