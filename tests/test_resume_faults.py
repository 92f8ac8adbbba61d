"""Faults injected into real runs: nothing lost in MLflow, nothing silent, one line per bad file.

Each test breaks one real thing (an MLflow table, the file-size limit, a checkpoint's
bytes, the config between two runs, two processes on one new store) and checks what
the user sees and what MLflow holds afterwards. Tiny digits runs (a few steps each).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_engine import TINY, overrides, runs_of

from zosam.cli import main
from zosam.config import load_config
from zosam.engine import CHECKPOINT_FILE, CheckpointError
from zosam.runner import CONFIG_CHANGE_TAG, run
from zosam.validate import ConfigError

PER_EPOCH = ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_time_s")


def metric_steps(uri: str, run_id: str) -> dict[str, list[int]]:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    return {k: sorted(m.step for m in c.get_metric_history(run_id, k)) for k in PER_EPOCH}


def tiny(experiment: str, *extra: str):
    return load_config(None, [*overrides(TINY), f"tracking.experiment={experiment}", *extra])


def test_metrics_are_in_mlflow_before_the_checkpoint_and_a_replayed_epoch_is_not_logged_twice(
        tmp_path: Path, store: str, experiment: str) -> None:
    """The epoch's metrics are logged before its checkpoint exists (a kill in between loses
    nothing), and resuming from an older checkpoint re-trains epochs that MLflow already
    has without writing their steps twice."""
    ckpt = tmp_path / "ckpt"
    seen: list[tuple[int, bool, set[int]]] = []

    def on_epoch(trainer, res, path, logger) -> None:
        seen.append((res.epoch, path is not None and path.is_file(), logger.logged_steps()))
        if res.epoch == 0:
            (ckpt / "epoch1.pt").write_bytes(path.read_bytes())

    first = run(tiny(experiment), checkpoint_dir=ckpt, tracking_uri=store, on_epoch=on_epoch, log=None)
    assert first.status == "finished"
    assert [(e, written) for e, written, _ in seen] == [(0, True), (1, True), (2, True)]
    for epoch, _, logged in seen:
        assert epoch + 1 in logged  # logged by the time the checkpoint was there
    (ckpt / "epoch1.pt").replace(ckpt / CHECKPOINT_FILE)
    again = run(tiny(experiment), resume=True, checkpoint_dir=ckpt, tracking_uri=store, log=None)
    assert again.status == "finished" and again.run_id == first.run_id
    assert metric_steps(store, first.run_id) == {k: [1, 2, 3] for k in PER_EPOCH}


def test_an_mlflow_write_failure_fails_the_run_with_its_reason_and_resume_fills_the_gap(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """MLflow's metrics table disappears after epoch 1 (a real store failure, as a full disk
    gives): the run ends FAILED with the reason, not RUNNING with tracebacks; once the store
    is back, ``--resume`` finishes the same MLflow run with every epoch logged once."""
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    ckpt = tmp_path / "ckpt"

    def break_store(trainer, res, path, logger) -> None:
        if res.epoch == 0:
            with sqlite3.connect(db) as con:
                con.execute("ALTER TABLE metrics RENAME TO metrics_away")

    failed = run(tiny("faults"), checkpoint_dir=ckpt, tracking_uri=uri, on_epoch=break_store)
    out, err = capsys.readouterr()
    assert failed.status == "failed"
    assert failed.reason.startswith(f"MLflow log_metrics on {uri} failed: ") and "metrics" in failed.reason
    assert "Traceback" not in out + err and "FAILED: MLflow log_metrics" in err

    from mlflow.tracking import MlflowClient

    r = MlflowClient(uri).get_run(failed.run_id)
    assert r.info.status == "FAILED" and r.data.tags["zosam.status"] == "failed"
    assert r.data.tags["zosam.failure_reason"] == failed.reason
    assert torch.load(ckpt / CHECKPOINT_FILE, weights_only=True)["epoch"] == 0  # epoch 2 was not committed

    with sqlite3.connect(db) as con:
        con.execute("ALTER TABLE metrics_away RENAME TO metrics")
    resumed = run(tiny("faults"), resume=True, checkpoint_dir=ckpt, tracking_uri=uri, log=None)
    assert resumed.status == "finished" and resumed.run_id == failed.run_id
    r = MlflowClient(uri).get_run(failed.run_id)
    assert r.info.status == "FINISHED" and r.data.tags["zosam.status"] == "finished"
    assert metric_steps(uri, failed.run_id) == {k: [1, 2, 3] for k in PER_EPOCH}


def test_resume_logs_epochs_that_the_checkpoint_has_and_mlflow_lacks(tmp_path: Path) -> None:
    """A checkpoint ahead of MLflow (written by a version that logged after checkpointing,
    or a store restored from a backup): the resume logs the missing epochs from the
    checkpoint's history, once."""
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    ckpt = tmp_path / "ckpt"
    first = run(tiny("faults"), checkpoint_dir=ckpt, tracking_uri=uri, log=None)
    with sqlite3.connect(db) as con:
        con.execute("DELETE FROM metrics WHERE step = 2")
    history = torch.load(ckpt / CHECKPOINT_FILE, weights_only=True)["history"]
    resumed = run(tiny("faults"), resume=True, checkpoint_dir=ckpt, tracking_uri=uri, log=None)
    assert resumed.status == "finished" and resumed.run_id == first.run_id
    assert metric_steps(uri, first.run_id) == {k: [1, 2, 3] for k in PER_EPOCH}
    from mlflow.tracking import MlflowClient

    (m,) = [m for m in MlflowClient(uri).get_metric_history(first.run_id, "train_loss") if m.step == 2]
    assert m.value == history[1]["train_loss"]


@pytest.fixture(scope="module")
def a_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real checkpoint of one tiny epoch (no MLflow)."""
    d = tmp_path_factory.mktemp("ckpt")
    cfg = load_config(None, [*overrides(TINY), "epochs=1", "max_steps_per_epoch=2", "tracking.enabled=false"])
    assert run(cfg, checkpoint_dir=d, log=None).status == "finished"
    return d / CHECKPOINT_FILE


@pytest.mark.parametrize("damage", ["truncated", "empty", "random bytes", "not a checkpoint"])
def test_a_damaged_checkpoint_is_one_line_naming_the_file_and_the_choices(
        tmp_path: Path, a_checkpoint: Path, damage: str, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    path = ckpt / CHECKPOINT_FILE
    good = a_checkpoint.read_bytes()
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
        (ckpt / "checkpoint-epoch0.pt").write_bytes(good)  # an older one beside it: named as a choice
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "random bytes":
        path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                       dtype=torch.uint8).numpy().tobytes())
    else:
        torch.save({"model": {"w": torch.zeros(2)}}, path)
    t0 = time.perf_counter()
    code = main(["train", *overrides(TINY), "epochs=1", "tracking.enabled=false", "--resume",
                 "--checkpoint-dir", str(ckpt)])
    err = capsys.readouterr().err
    assert code == 2
    why = {"truncated": "", "empty": "the file ends early (empty or cut off)",
           "random bytes": "not a torch checkpoint (unpickling failed)",
           "not a checkpoint": "KeyError: 'not a zosam checkpoint (missing epoch, global_step, optimizer)'"}[damage]
    assert err.startswith(f"zosam train: error: checkpoint {path} is unreadable: {why}") and err.count("\n") == 1, err
    assert "start over: delete" in err and "Traceback" not in err
    assert ("checkpoint-epoch0.pt" in err) == (damage == "truncated")
    assert time.perf_counter() - t0 < 30  # refused before any data or model is built
    with pytest.raises(CheckpointError):  # a ConfigError: the CLI's exit 2
        run(load_config(None, [*overrides(TINY), "tracking.enabled=false"]), resume=True, checkpoint_dir=ckpt)


def test_resume_with_a_changed_config_is_refused_unless_allowed_and_then_recorded(
        tmp_path: Path, store: str, experiment: str, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "ckpt"
    first = run(tiny(experiment, "epochs=2"), checkpoint_dir=ckpt, tracking_uri=store, log=None)
    assert first.status == "finished", first.reason
    changed = [*overrides(TINY), f"tracking.experiment={experiment}", "epochs=3", "optimizer.lr=0.5"]
    capsys.readouterr()
    code = main(["train", *changed, "--resume", "--checkpoint-dir", str(ckpt), "--tracking-uri", store])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("zosam train: error: --resume with a changed config: epochs (2 -> 3), "
                          "optimizer.lr (0.1 -> 0.5); "), err
    assert "--allow-config-change" in err
    # Where things are may change: a new checkpoint folder or tracking URI is not a change.
    with pytest.raises(ConfigError, match=r"changed config: epochs \(2 -> 3\); "):
        run(tiny(experiment, "epochs=3", f"checkpoint.dir={tmp_path / 'elsewhere'}"), resume=True,
            checkpoint_dir=ckpt, tracking_uri=store)

    code = main(["train", *changed, "--resume", "--allow-config-change", "--checkpoint-dir", str(ckpt),
                 "--tracking-uri", store])
    assert code == 0
    from mlflow.tracking import MlflowClient

    r = MlflowClient(store).get_run(first.run_id)
    assert r.data.tags[CONFIG_CHANGE_TAG] == "at epoch 2: epochs (2 -> 3), optimizer.lr (0.1 -> 0.5)"
    assert r.data.params["epochs"] == "2"  # MLflow keeps the first params; the tag says what changed
    assert metric_steps(store, first.run_id)["train_loss"] == [1, 2, 3]
    arts = {a.path for a in MlflowClient(store).list_artifacts(first.run_id, "config_changes")}
    assert arts == {"config_changes/epoch_2.yaml"}


def test_a_full_disk_while_checkpointing_leaves_no_partial_file(tmp_path: Path, a_checkpoint: Path) -> None:
    """The file-size limit (``RLIMIT_FSIZE``, below the checkpoint's size) makes the save fail
    as a full disk does: the error propagates (a traceback: it is not bad input) and neither
    the partial ``checkpoint.tmp`` nor a stale one from an earlier kill is left."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "checkpoint.tmp").write_bytes(b"left by a killed save")
    limit = a_checkpoint.stat().st_size // 2
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"  # write() fails with EFBIG instead of killing
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "from zosam.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = ["train", *overrides(TINY), "epochs=1", "max_steps_per_epoch=2", "tracking.enabled=false",
            "--checkpoint-dir", str(ckpt)]
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" in proc.stderr and "in save_checkpoint" in proc.stderr  # failed writing, with its cause
    assert sorted(p.name for p in ckpt.iterdir()) == []


def test_an_unwritable_checkpoint_folder_fails_before_training(
        tmp_path: Path, store: str, experiment: str, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    t0 = time.perf_counter()
    code = main(["train", *overrides(TINY), f"tracking.experiment={experiment}", "--checkpoint-dir",
                 str(blocker / "ckpt"), "--tracking-uri", store])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"zosam train: error: --checkpoint-dir='{blocker / 'ckpt'}' is invalid; {blocker} is a "
                          "file, not a folder"), err
    assert time.perf_counter() - t0 < 30
    assert runs_of(experiment) == []  # nothing logged: refused before the run existed


def test_two_runs_started_together_on_a_new_sqlite_store_both_succeed(tmp_path: Path) -> None:
    """Both create the store's schema at once; a file lock makes one of them do it."""
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    procs = []
    for i in range(2):
        d = tmp_path / f"run{i}"
        d.mkdir()
        argv = ["train", *overrides(TINY), f"name=together{i}", "epochs=1", "max_steps_per_epoch=2",
                "tracking.experiment=together", "--tracking-uri", uri, "--checkpoint-dir", str(d / "ckpt")]
        procs.append(subprocess.Popen([sys.executable, "-m", "zosam.cli", *argv], cwd=d,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-1500:] for e in errs)
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    (exp,) = [e for e in c.search_experiments() if e.name == "together"]
    runs = c.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["together0", "together1"]
    assert {r.info.status for r in runs} == {"FINISHED"}


@pytest.mark.parametrize("key", ["it's", 'say "hi"', "x' and tags.`zosam.host` = 'rigl", "back\\slash `tick`"])
def test_a_run_key_is_matched_exactly_whatever_it_holds(store: str, experiment: str, key: str) -> None:
    """Lookups by run key (restarted trials) never paste the key into a filter: quotes do not
    break them and a crafted key does not attach a logger to another run."""
    from zosam.tracking import RunLogger

    other = RunLogger(store, experiment, "other", tags={"zosam.host": "rigl"}, run_key="x")
    first = RunLogger(store, experiment, "keyed", run_key=key)
    again = RunLogger(store, experiment, "keyed", run_key=key)
    assert again.run_id == first.run_id != other.run_id
    assert RunLogger(store, experiment, "another", run_key=key + "!").run_id not in (first.run_id, other.run_id)


def test_a_run_logs_its_model_whatever_experiment_the_process_has_set(
        tmp_path: Path, store: str, experiment: str) -> None:
    """Other code in the process (a benchmark, a notebook) may have set MLflow's process-wide
    experiment to another one: the run still ends finished with its model logged to its own."""
    import mlflow

    mlflow.set_tracking_uri(store)
    mlflow.set_experiment(f"{experiment}-elsewhere")
    out = run(tiny(experiment, "epochs=1"), checkpoint_dir=tmp_path / "ckpt", tracking_uri=store, log=None)
    assert out.status == "finished", out.reason
    client = mlflow.MlflowClient(store)
    model_id = client.get_run(out.run_id).data.tags["zosam.model_id"]
    assert client.get_logged_model(model_id).source_run_id == out.run_id


def test_the_logged_model_is_the_weights_whose_accuracy_is_reported(
        tmp_path: Path, store: str, experiment: str) -> None:
    """With a weight EMA, ``test_acc`` is the EMA's: the run's logged model is the EMA too,
    so ``mlflow.pytorch.load_model`` gives the model that scores the logged accuracy."""
    import mlflow

    out = run(tiny(experiment, "epochs=2", "model_ema_decay=0.5"), checkpoint_dir=tmp_path / "ckpt",
              tracking_uri=store, log=None)
    assert out.status == "finished", out.reason
    model_id = mlflow.MlflowClient(store).get_run(out.run_id).data.tags["zosam.model_id"]
    mlflow.set_tracking_uri(store)
    logged = mlflow.pytorch.load_model(f"models:/{model_id}").state_dict()
    ckpt = torch.load(tmp_path / "ckpt" / CHECKPOINT_FILE, weights_only=True)
    for name, value in ckpt["ema"].items():
        assert torch.equal(logged[name], value.float()), name
    assert any(not torch.equal(logged[n], v.float()) for n, v in ckpt["model"].items() if v.is_floating_point())
