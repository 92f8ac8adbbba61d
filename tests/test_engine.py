"""The training engine end to end: `zosam train` -> MLflow, resume, divergence, diagnostics, AMP.

Every run is real (digits, a tiny CNN, a few steps); MLflow writes to a temporary sqlite
store and is read back through MLflow's own API.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from zosam.cli import main
from zosam.config import load_config
from zosam.engine import CHECKPOINT_FILE
from zosam.runner import run

# ZO-SAM on a RigL host: masks change during the run, the optimizer draws directions from
# its seed stream and the LR follows the warm-up + cosine schedule.
TINY = {
    "name": "tiny-zosam-rigl",
    "seed": 3,
    "epochs": 3,
    "max_steps_per_epoch": 4,
    "data": {"name": "digits", "image_size": 16, "train_subset": 256, "test_subset": 100,
             "batch_size": 32, "eval_batch_size": 100},
    "model": {"name": "tiny_cnn", "width": 8},
    "optimizer": {"name": "zosam", "base": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5.0e-4,
                  "rho": 0.05, "mu": 1.0e-3, "q": 1},
    "sparse": {"method": "rigl", "distribution": "erk", "density": 0.5, "update_interval": 2,
               "drop_fraction": 0.3, "end_fraction": 0.75, "dense_first_layer": False},
    "schedule": {"warmup_epochs": 0.5},
    "checkpoint": {"every": 1},
    "tracking": {"experiment": "engine-tests"},
}

# Summary metrics that must not depend on timing.
DETERMINISTIC = ("final_test_acc", "final_test_loss", "best_test_acc", "best_epoch", "realised_density",
                 "active_flops", "passes_forward", "passes_forward_no_grad", "passes_backward", "steps")

# An MLP at an absurd learning rate: NaN loss within a couple of steps.
DIVERGING = [
    "name=diverge", "data.name=digits", "data.image_size=8", "data.train_subset=256", "data.test_subset=64",
    "data.batch_size=32", "model.name=mlp", "model.in_features=192", "model.hidden=[32]",
    "optimizer.lr=1e10", "optimizer.momentum=0", "optimizer.weight_decay=0", "epochs=2",
    "max_steps_per_epoch=8", "tracking.experiment=engine-tests",
]


def overrides(d: dict, prefix: str = "") -> list[str]:
    """``TINY`` as ``key.path=value`` command-line overrides."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += overrides(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}")
    return out


def write_config(path: Path, **changes) -> Path:
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    for key, value in changes.items():
        section, _, leaf = key.rpartition("__")
        (d[section] if section else d)[leaf] = value  # "tracking__experiment": a nested key
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def runs_of(experiment: str):
    import mlflow

    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def test_train_on_digits_logs_everything_to_mlflow(tmp_path: Path, store: str, experiment: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from mlflow.tracking import MlflowClient

    cfg_path = write_config(tmp_path / "run.yaml", tracking__experiment=experiment)
    code = main(["train", "--config", str(cfg_path), "optimizer.rho=0.1", "--tracking-uri", store])
    out = capsys.readouterr().out
    assert code == 0
    assert "final_test_acc" in out and "passes_backward" in out  # the summary table

    (r,) = runs_of(experiment)
    assert r.info.status == "FINISHED"
    params, metrics, tags = r.data.params, r.data.metrics, r.data.tags
    # The full resolved config as dotted params (the override applied).
    assert params["optimizer.rho"] == "0.1"
    assert params["optimizer.name"] == "zosam"
    assert params["sparse.density"] == "0.5"
    assert params["sparse.method"] == "rigl"
    assert params["data.name"] == "digits"
    assert params["seed"] == "3"
    assert params["epochs"] == "3"
    # Tags compare and sweeps group by.
    assert tags["zosam.optimizer"] == "zosam"
    assert tags["zosam.host"] == "rigl"
    assert tags["zosam.density"] == "0.5"
    assert tags["zosam.dataset"] == "digits"
    assert tags["zosam.model"] == "tiny_cnn"
    assert tags["zosam.seed"] == "3"
    assert tags["zosam.status"] == "finished"
    assert "zosam.failure_reason" not in tags
    # Per-epoch metrics: one value per epoch at steps 1..epochs.
    client = MlflowClient(store)
    for name in ("test_acc", "test_loss", "train_loss", "train_acc", "lr", "epoch_time_s"):
        hist = client.get_metric_history(r.info.run_id, name)
        assert sorted(m.step for m in hist) == [1, 2, 3], name
    accs = [m.value for m in sorted(client.get_metric_history(r.info.run_id, "test_acc"), key=lambda m: m.step)]
    assert accs == pytest.approx([round(a * 100) / 100 for a in accs])  # counts over the 100 test images
    assert metrics["final_test_acc"] == accs[-1]
    assert metrics["best_test_acc"] == max(accs)
    lrs = [m.value for m in sorted(client.get_metric_history(r.info.run_id, "lr"), key=lambda m: m.step)]
    assert lrs[0] > lrs[1] > lrs[2] >= 0.0  # cosine decay after the warm-up
    # Summary metrics: ZO-SAM costs one backward per step; RigL kept the density.
    assert metrics["steps"] == 3 * 4
    assert metrics["passes_backward"] == metrics["steps"]
    assert metrics["realised_density"] == pytest.approx(0.5, abs=0.01)
    assert metrics["images_per_s"] > 0 and metrics["wall_time_s"] > 0
    assert metrics["active_flops"] > 0
    # Artifacts: resolved config, layer densities, history, and a real PNG.
    root = Path(client.download_artifacts(r.info.run_id, "", str(tmp_path / "dl")))
    names = {p.name for p in root.iterdir()}
    assert {"config.yaml", "layer_density.md", "learning_curves.png", "history.yaml"} <= names
    assert yaml.safe_load((root / "config.yaml").read_text())["optimizer"]["rho"] == 0.1
    assert "| **global** | 0.5" in (root / "layer_density.md").read_text()
    history = yaml.safe_load((root / "history.yaml").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert [h["test_acc"] for h in history] == accs
    png = (root / "learning_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    # The checkpoint is a plain weights-only file.
    ckpt = torch.load(tmp_path / "runs" / "tiny-zosam-rigl" / CHECKPOINT_FILE, weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["extra"]["mlflow_run_id"] == r.info.run_id


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path: Path, store: str, experiment: str) -> None:
    """Kill `zosam train` (a subprocess) after its first checkpoint, resume it, and compare
    with a run that was never interrupted: identical weights, one MLflow run, equal metrics."""
    from mlflow.tracking import MlflowClient

    epochs, steps = 4, 5
    cfg_path = write_config(tmp_path / "run.yaml", epochs=epochs, max_steps_per_epoch=steps,
                            tracking__experiment=experiment)
    killed_dir, ref_dir = tmp_path / "killed", tmp_path / "ref"
    killed_dir.mkdir()
    cmd = [sys.executable, "-m", "zosam.cli", "train", "--config", str(cfg_path), "--tracking-uri", store,
           "--checkpoint-dir", str(killed_dir / "ckpt")]
    proc = subprocess.Popen(cmd, cwd=killed_dir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt_file = killed_dir / "ckpt" / CHECKPOINT_FILE
    deadline = time.monotonic() + 240
    while not ckpt_file.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    killed_at = torch.load(ckpt_file, weights_only=True)["epoch"]
    assert killed_at < epochs - 1  # it really stopped before the end

    cfg = load_config(cfg_path)
    resumed = run(cfg, resume=True, checkpoint_dir=killed_dir / "ckpt", tracking_uri=store, log=None)
    cfg_ref = load_config(cfg_path, [f"tracking.experiment={experiment}-ref"])
    reference = run(cfg_ref, checkpoint_dir=ref_dir / "ckpt", tracking_uri=store, log=None)
    assert resumed.status == reference.status == "finished", (resumed.reason, reference.reason)

    a = torch.load(killed_dir / "ckpt" / CHECKPOINT_FILE, weights_only=True)
    b = torch.load(ref_dir / "ckpt" / CHECKPOINT_FILE, weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert a["masking"]["masks"].keys() == b["masking"]["masks"].keys()
    for name, mask in a["masking"]["masks"].items():
        assert torch.equal(mask, b["masking"]["masks"][name]), name
    assert a["masking"]["num_updates"] == b["masking"]["num_updates"] > 0  # RigL really updated
    assert a["global_step"] == b["global_step"] == epochs * steps
    for key in DETERMINISTIC:
        assert resumed.summary[key] == reference.summary[key], key

    # One MLflow run, continued by the resume (its id came from the checkpoint).
    client = MlflowClient(store)
    (r,) = runs_of(experiment)
    assert r.info.run_id == resumed.run_id
    assert r.info.status == "FINISHED" and r.data.tags["zosam.status"] == "finished"
    ref_run = client.get_run(reference.run_id)
    for key in DETERMINISTIC:
        assert r.data.metrics[key] == ref_run.data.metrics[key], key
    # No gap and nothing twice: the killed epoch's metrics reached MLflow before its checkpoint.
    for name in ("train_loss", "test_acc", "lr"):
        steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, name))
        assert steps == list(range(1, epochs + 1)), name


def test_divergence_fails_cleanly_with_a_reason(tmp_path: Path, store: str, experiment: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(None, [*DIVERGING, f"tracking.experiment={experiment}"])
    outcome = run(cfg, checkpoint_dir=tmp_path / "ckpt", tracking_uri=store)
    assert outcome.status == "failed"
    assert "non-finite" in outcome.reason and "epoch 0" in outcome.reason
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert "FAILED: non-finite" in err  # a failure is reported on stderr

    (r,) = runs_of(experiment)
    assert r.info.run_id == outcome.run_id
    assert r.info.status == "FAILED"
    assert r.data.tags["zosam.status"] == "failed"
    assert "non-finite training loss" in r.data.tags["zosam.failure_reason"]
    assert r.data.metrics["diverged_at_step"] < 8


@pytest.mark.parametrize(("code", "status", "mlflow_status"), [(0, "stopped_early", "KILLED"),
                                                              (143, "failed", "FAILED")])
def test_a_run_stopped_from_outside_records_how_it_ended(tmp_path: Path, store: str, experiment: str,
                                                         code: int, status: str, mlflow_status: str) -> None:
    """Ray Tune stops a trial with ``sys.exit(0)`` inside its report (an early stop); the
    CLI turns SIGTERM into ``sys.exit(143)`` (a kill). Neither may leave the run RUNNING
    or call an early stop a failure."""
    cfg = load_config(None, [*overrides(TINY), f"tracking.experiment={experiment}"])

    def stop(trainer, res, path, logger) -> None:
        raise SystemExit(code)

    with pytest.raises(SystemExit):
        run(cfg, checkpoint_dir=tmp_path / "ckpt", tracking_uri=store, on_epoch=stop)
    (r,) = runs_of(experiment)
    assert r.info.status == mlflow_status
    assert r.data.tags["zosam.status"] == status
    assert ("after epoch 1" if code == 0 else "status 143") in r.data.tags["zosam.failure_reason"]


def test_cli_exit_code_3_on_divergence(tmp_path: Path, store: str, experiment: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", *DIVERGING, f"tracking.experiment={experiment}", "--checkpoint-dir", str(tmp_path / "ckpt")])
    out, err = capsys.readouterr()
    assert code == 3
    assert "Traceback" not in out + err
    (r,) = runs_of(experiment)  # the default URI comes from $MLFLOW_TRACKING_URI
    assert r.data.tags["zosam.status"] == "failed"


def test_diagnostics_on_zosam_do_not_change_pass_counts(tmp_path: Path) -> None:
    base = [*overrides(TINY), "epochs=1", "max_steps_per_epoch=4", "tracking.enabled=false"]
    with_diag = run(load_config(None, [*base, "eval.diagnostics_steps=3"]), checkpoint_dir=tmp_path / "a", log=None)
    without = run(load_config(None, base), checkpoint_dir=tmp_path / "b", log=None)
    assert with_diag.status == without.status == "finished"
    ckpt = torch.load(tmp_path / "a" / CHECKPOINT_FILE, weights_only=True)
    (epoch,) = ckpt["history"]
    diag = epoch["diagnostics"]
    assert set(diag) == {"diag_cosine", "diag_sharpness_gap"}
    # A random direction with a measured sign: it ascends (positive), and is far from the
    # gradient itself (about sqrt(q / d), d in the thousands).
    assert 0.0 < diag["diag_cosine"] < 0.5
    assert math.isfinite(diag["diag_sharpness_gap"])
    for key in ("passes_forward", "passes_forward_no_grad", "passes_backward", "steps"):
        assert with_diag.summary[key] == without.summary[key], key
    assert with_diag.summary["passes_backward"] == with_diag.summary["steps"] == 4
    # The extra passes leave the weights alone: both runs end with the same model.
    other = torch.load(tmp_path / "b" / CHECKPOINT_FILE, weights_only=True)
    for name, t in ckpt["model"].items():
        assert torch.equal(t, other["model"][name]), name


def test_diagnostics_are_silent_for_optimizers_without_an_estimate(tmp_path: Path) -> None:
    cfg = load_config(None, ["model.name=tiny_cnn", "model.width=8", "data.name=digits", "data.image_size=16",
                             "data.train_subset=64", "data.test_subset=50", "data.batch_size=32",
                             "epochs=1", "max_steps_per_epoch=2", "eval.diagnostics_steps=2",
                             "tracking.enabled=false"])
    outcome = run(cfg, checkpoint_dir=tmp_path, log=None)
    assert outcome.status == "finished"
    (epoch,) = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["history"]
    assert epoch["diagnostics"] == {}


def test_amp_bf16_on_cpu_trains(tmp_path: Path) -> None:
    cfg = load_config(None, [*overrides(TINY), "amp=bf16", "device=cpu", "epochs=1", "max_steps_per_epoch=2",
                             "tracking.enabled=false"])
    outcome = run(cfg, checkpoint_dir=tmp_path, log=None)
    assert outcome.status == "finished", outcome.reason
    assert outcome.summary["steps"] == 2 == outcome.summary["passes_backward"]
    ckpt = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    acc = outcome.summary["final_test_acc"]
    assert acc == ckpt["history"][-1]["test_acc"] and acc * 100 == pytest.approx(round(acc * 100))  # of 100 images
    state = ckpt["model"]
    assert all(t.dtype != torch.bfloat16 for t in state.values())  # autocast keeps fp32 weights
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_float64_runs_keep_float64_through_the_step(tmp_path: Path) -> None:
    """``dtype=float64``: weights, inputs, query losses and norms stay float64 (nothing is
    rounded to float32 on the way), so runs that differ only in reduction order agree to
    rounding on any CPU."""
    cfg = load_config(None, [*overrides(TINY), "dtype=float64", "optimizer.name=zosam", "optimizer.q=2",
                             "epochs=1", "max_steps_per_epoch=2", "tracking.enabled=false"])
    outcome = run(cfg, checkpoint_dir=tmp_path, log=None)
    assert outcome.status == "finished", outcome.reason
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["model"]
    floats = [t for t in state.values() if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float64 for t in floats)
