"""Command-line conventions: results on stdout, progress and errors on stderr, exit codes,
one override spelling, one --tracking-uri flag, --version, and the demo's digits fallback."""

from __future__ import annotations

import importlib.metadata
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from zosam.cli import build_parser, main
from zosam.cliargs import parse_args

ROOT = Path(__file__).resolve().parent.parent
DIGITS = str(ROOT / "configs" / "digits.yaml")
SMALL = ["epochs=2", "max_steps_per_epoch=3", "data.image_size=8", "data.train_subset=192", "data.test_subset=64",
         "data.batch_size=32", "model.width=8", "eval.diagnostics_steps=0"]


def _zosam(args: list[str], tmp_path: Path, code: str | None = None) -> subprocess.CompletedProcess[str]:
    """``zosam ARGS`` in a fresh interpreter, stderr a pipe (not a terminal); ``code`` runs first."""
    prog = (code or "") + "\nimport sys\nfrom zosam.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    return subprocess.run([sys.executable, "-c", prog, *args], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)


def test_train_prints_results_on_stdout_and_progress_on_stderr(tmp_path: Path) -> None:
    p = _zosam(["train", "--config", DIGITS, *SMALL, "--checkpoint-dir", str(tmp_path / "ckpt")], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout.splitlines()
    # stdout: the results block and nothing else (a script can parse it).
    assert out[0] == "run 'digits-zosam-rigl' finished (scikit-learn digits (8x8 upsampled), final-epoch " \
                     "accuracy is the headline)"
    assert out[-1] == f"checkpoint: {tmp_path / 'ckpt' / 'checkpoint.pt'}"
    table = dict(line.split(maxsplit=1) for line in out[1:-1])
    assert 0.0 <= float(table["final_test_acc"]) <= 1.0 and table["steps"] == "6"
    assert "epoch 1/2" not in p.stdout and "loss" not in out[0]
    # stderr: one line per epoch; no progress bar or carriage return when it is not a terminal.
    epochs = [line for line in p.stderr.splitlines() if line.startswith("epoch ")]
    assert [e.split()[1] for e in epochs] == ["1/2", "2/2"] and "test_acc" in epochs[-1]
    assert "\r" not in p.stderr and "step/s" not in p.stderr


def test_bad_config_exits_2_with_one_line_naming_the_field(tmp_path: Path) -> None:
    p = _zosam(["train", "--config", DIGITS, "optimizer.rho=-1"], tmp_path)
    assert p.returncode == 2
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zosam train: error: ") and "optimizer.rho" in lines[0]


def test_an_unexpected_error_keeps_its_traceback_and_is_not_exit_2(tmp_path: Path) -> None:
    # A bug inside the training loop, raised as a ValueError (the base class of ConfigError):
    # it must not pass for bad input.
    bug = ("import zosam.engine\n"
           "def fit(self):\n"
           "    raise ValueError('a bug in the loop')\n"
           "zosam.engine.Trainer.fit = fit\n")
    p = _zosam(["train", "--config", DIGITS, *SMALL, "tracking.enabled=false", "--checkpoint-dir",
                str(tmp_path / "ckpt")], tmp_path, code=bug)
    assert p.returncode not in (0, 2)
    assert "Traceback (most recent call last)" in p.stderr and "ValueError: a bug in the loop" in p.stderr
    assert "zosam train: error" not in p.stderr


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_epoch_progress_bar_with_eta_on_a_terminal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from zosam.config import load_config
    from zosam.console import eprint
    from zosam.engine import Trainer

    cfg = load_config(DIGITS, [*SMALL, "epochs=1", "tracking.enabled=false"])
    for terminal, log in ((True, eprint), (False, eprint), (True, None)):
        err = _Terminal() if terminal else io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        Trainer(cfg, log=log).fit()
        text = err.getvalue()
        # tqdm: the description, steps done of 3, [elapsed<ETA, rate] (redraws are time-throttled).
        drawn = re.search(r"epoch 1/1: .*\d/3 \[\d\d:\d\d<[\d:?]+, [\d.?]+step/s", text) is not None
        assert drawn == (terminal and log is not None), text
        assert ("epoch 1/1  loss" in text) == (log is not None)  # the epoch line, bar or not


def test_one_override_spelling_with_deprecated_aliases(capsys: pytest.CaptureFixture[str]) -> None:
    p = build_parser()
    args = parse_args(p, ["sweep", "tune/quick.yaml", "num_trials=4", "--resume", "base.epochs=2"])
    assert args.overrides == ["num_trials=4", "base.epochs=2"] and args.resume
    assert capsys.readouterr().err == ""
    old = parse_args(p, ["sweep", "tune/quick.yaml", "--set", "num_trials=4", "--set", "base.epochs=2"])
    assert old.overrides == args.overrides
    assert capsys.readouterr().err.count("--set") == 2  # one deprecation line each
    assert parse_args(p, ["compare", "optimizer=sgd", "host=rigl"]).tag == ["optimizer=sgd", "host=rigl"]
    assert parse_args(p, ["compare", "--tag", "optimizer=sgd"]).tag == ["optimizer=sgd"]
    assert "deprecated" in capsys.readouterr().err
    train = parse_args(p, ["train", "--config", DIGITS, "optimizer.rho=0.1", "--resume", "seed=3"])
    assert train.overrides == ["optimizer.rho=0.1", "seed=3"]
    with pytest.raises(SystemExit) as e:  # a stray word is not an override
        parse_args(p, ["train", "--config", DIGITS, "seed=1", "--resume", "seed"])
    assert e.value.code == 2


def test_one_tracking_uri_flag_on_every_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    from zosam.bench import cluster_overhead, ddp_comm, flatness, step_cost

    for module, dest, old in ((step_cost, "mlflow", "--mlflow"), (ddp_comm, "mlflow", "--mlflow"),
                              (cluster_overhead, "mlflow", "--mlflow")):
        parser = module.build_parser()
        assert getattr(parser.parse_args(["--tracking-uri", "sqlite:///a.db"]), dest) == "sqlite:///a.db"
        assert capsys.readouterr().err == ""
        assert getattr(parser.parse_args([old, "sqlite:///b.db"]), dest) == "sqlite:///b.db"
        assert f"{old} is deprecated" in capsys.readouterr().err
    args = parse_args(flatness.build_parser(), ["--quick", "epochs=3", "--jobs", "1", "seed=2"])
    assert args.overrides == ["epochs=3", "seed=2"] and args.tracking_uri is None
    # data-speed builds its parser in main(): its help names the one flag.
    from zosam.bench import data_speed

    with pytest.raises(SystemExit):
        data_speed.main(["--help"])
    assert "--tracking-uri URI" in capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"zosam {importlib.metadata.version('zosam')}"


def test_demo_falls_back_to_digits_when_the_archive_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from zosam.config import RunConfig
    from zosam.data import load_dataset
    from zosam.demo import DIGITS_FALLBACK, QUICK_SPEC, demo_overrides
    from zosam.sweep import load_spec

    nowhere = tmp_path / "no" / "cifar10-jpeg.tar.gz"
    monkeypatch.setenv("ZOSAM_CIFAR10_JPEG", str(nowhere))
    overrides = demo_overrides(["num_trials=2"], stamp="t")
    assert overrides == ["name=quick-t", *DIGITS_FALLBACK, "num_trials=2"]
    err = capsys.readouterr().err
    assert str(nowhere) in err and "digits" in err and err.count("\n") == 1
    # The same sweep, on digits: the spec is valid and its base config loads the whole set.
    spec = load_spec(QUICK_SPEC, overrides)
    plain = load_spec(QUICK_SPEC, ["name=quick-t", "num_trials=2"])
    assert spec.space == plain.space and spec.num_trials == plain.num_trials == 2
    assert {k: v for k, v in spec.base.items() if k != "data"} == {k: v for k, v in plain.base.items() if k != "data"}
    bundle = load_dataset(RunConfig.from_dict(spec.base).data)
    assert bundle.name == "digits" and len(bundle.train.labels) + len(bundle.test.labels) == 1797  # all of it
    # The archive there, or a data set the user chose: no fallback, nothing said.
    nowhere.parent.mkdir()
    nowhere.write_bytes(b"")
    assert demo_overrides(stamp="t") == ["name=quick-t"]
    monkeypatch.setenv("ZOSAM_CIFAR10_JPEG", str(tmp_path / "missing.tar.gz"))
    assert demo_overrides(["base.data.name=cifar10"], stamp="t") == ["name=quick-t", "base.data.name=cifar10"]
    assert capsys.readouterr().err == ""


def test_makefile_demo_runs_zosam_demo() -> None:
    make = (ROOT / "Makefile").read_text()
    demo = make.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "$(BIN)/zosam demo" in demo
    assert "pip install --quiet -e '.[dev]'" in make
