"""Run config: every shipped config validates; bad input is a ValueError naming the field."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from zosam.cli import main
from zosam.config import RunConfig, apply_overrides, load_config, parse_value
from zosam.validate import MAX_MESSAGE, ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_and_validate(path: Path) -> None:
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    assert cfg.name == raw["name"]
    assert cfg.epochs == raw["epochs"]
    assert cfg.optimizer.name == raw["optimizer"]["name"]
    # The resolved config is a fixed point: dumping and re-loading gives the same config.
    assert RunConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_shipped_configs_found() -> None:
    names = {p.name for p in CONFIGS}
    assert {"digits.yaml", "cifar10_resnet32_rigl90_zosam.yaml"} <= names


ZOSAM = ["optimizer.name=zosam"]
RIGL = ["sparse.method=rigl"]

# (overrides, the start of the message: the dotted field it names)
BAD = [
    (["foo=1"], "unknown key foo"),
    (["data.bogus=1"], "unknown key data.bogus"),
    (["model.bogus=1"], "unknown key model.bogus"),
    (["optimizer.bogus=1"], "unknown key optimizer.bogus"),
    (["schedule.bogus=1"], "unknown key schedule.bogus"),
    (["checkpoint.bogus=1"], "unknown key checkpoint.bogus"),
    (["eval.bogus=1"], "unknown key eval.bogus"),
    (["tracking.bogus=1"], "unknown key tracking.bogus"),
    (["sparse.bogus=1"], "unknown key sparse.bogus"),
    # ZO-SAM's own hyperparameters are not SGD's: rho on plain SGD is an unknown key.
    (["optimizer.rho=0.05"], "unknown key optimizer.rho"),
    ([*ZOSAM, "optimizer.rho=0"], "optimizer.rho=0 "),
    ([*ZOSAM, "optimizer.mu=-1e-3"], "optimizer.mu=-0.001 "),
    ([*ZOSAM, "optimizer.q=0"], "optimizer.q=0 "),
    ([*ZOSAM, "optimizer.q=1.5"], "optimizer.q=1.5 "),
    (["optimizer.lr=-1"], "optimizer.lr=-1 "),
    (["optimizer.momentum=abc"], "optimizer.momentum='abc' "),
    (["optimizer.weight_decay=-1"], "optimizer.weight_decay=-1 "),
    (["optimizer.max_grad_norm=0"], "optimizer.max_grad_norm=0 "),
    (["optimizer.base=adamw", "optimizer.betas=[2, 0.9]"], "optimizer: Invalid beta"),
    (["optimizer.name=nope"], "optimizer.name='nope' "),
    (["optimizer.base=nope"], "optimizer.base='nope' "),
    (["model.name=nope"], "model.name='nope' "),
    (["data.name=nope"], "data.name='nope' "),
    (["model.name=tiny_cnn", "model.width=0"], "model.width=0 "),
    (["model.name=mlp", "model.hidden=[16, 0]"], "model.hidden[1]=0 "),
    (["model.name=resnet50", "model.variant=nope"], "model.variant='nope' "),
    (["data.batch_size=0"], "data.batch_size=0 "),
    (["data.train_subset=-5"], "data.train_subset=-5 "),
    ([*RIGL, "sparse.density=0"], "sparse.density=0 "),
    ([*RIGL, "sparse.density=1.5"], "sparse.density=1.5 "),
    ([*RIGL, "sparse.update_interval=-1"], "sparse.update_interval=-1 "),
    ([*RIGL, "sparse.drop_fraction=1"], "sparse.drop_fraction=1 "),
    (["sparse.method=nope"], "sparse.method='nope' "),
    (["epochs=0"], "epochs=0 "),
    (["epochs=2.5"], "epochs=2.5 "),
    (["seed=-1"], "seed=-1 "),
    (["amp=fp8"], "amp='fp8' "),
    (["dtype=float16"], "dtype='float16' "),
    (["dtype=float64", "amp=bf16"], "amp='bf16' is invalid with dtype='float64'"),
    (["device=tpu"], "device='tpu' "),
    (["label_smoothing=1"], "label_smoothing=1 "),
    (["max_steps_per_epoch=0"], "max_steps_per_epoch=0 "),
    (["schedule.warmup_epochs=-1"], "schedule.warmup_epochs=-1 "),
    (["schedule.min_lr=-0.1"], "schedule.min_lr=-0.1 "),
    (["checkpoint.every=0"], "checkpoint.every=0 "),
    (["checkpoint.keep=0"], "checkpoint.keep=0 "),
    (["eval.every=0"], "eval.every=0 "),
    (["eval.diagnostics_steps=-1"], "eval.diagnostics_steps=-1 "),
    (["eval.corruption_subset=0"], "eval.corruption_subset=0 "),
    (["tracking.enabled=maybe"], "tracking.enabled='maybe' "),
    (["name="], "name=None "),
    (["data=3"], "data must be a mapping"),
    (["epochs"], "override 'epochs' is invalid"),
    (["=3"], "override '=3' is invalid"),
    (["epochs.x=1"], "epochs={'x': 1} "),
    # Found by trying it as a new user would.
    (["optimizer.lr=0"], "optimizer.lr=0 is invalid; must be a number in (0, inf)"),
    (["seed=99999999999999999999"], "seed=99999999999999999999 is invalid; must be an integer in [0, 4294967295]"),
    (["name=../../escaped-run"], "name='../../escaped-run' is invalid; must be 1-128 characters"),
    (["name=a/b"], "name='a/b' is invalid"),
    (["name=.."], "name='..' is invalid"),
    (["checkpoint.dir=5"], "checkpoint.dir=5 is invalid; must be a folder path"),
    (["eval.corruptions=[1]"], "eval.corruptions=[1] is invalid; must be a folder path"),
    (["tracking.uri=notauri"], "tracking.uri='notauri' is invalid; must be an MLflow tracking URI with a scheme"),
    (["tracking.uri=ftp://x"], "tracking.uri='ftp://x' is invalid; the scheme must be one of sqlite, http"),
    (["tracking.uri=sqlite://relative.db"], "tracking.uri='sqlite://relative.db' is invalid; a sqlite store is"),
    (["tracking.uri=http://host:99999"], "tracking.uri='http://host:99999' is invalid; Port out of range"),
    (["tracking.experiment=''"], "tracking.experiment='' is invalid; must be a non-empty single-line string"),
    (["optimizer.lr=[1"], "override 'optimizer.lr=[1': value '[1': line 1, column 3: invalid YAML: "),
    (["a..b=1"], "override 'a..b=1' is invalid"),
    (["name=" + "x" * 100000], "name='xxxx"),  # the message shows a bounded part of the value
]


@pytest.mark.parametrize(("overrides", "start"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_input_is_a_config_error_naming_the_field(overrides: list[str], start: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.name=tiny_cnn", *overrides])  # a cheap model; later overrides win
    msg = str(info.value)
    assert msg.startswith(start), msg
    assert "\n" not in msg and len(msg) <= MAX_MESSAGE


ALIAS_BOMB = (  # 306 bytes that expand to 9^6 strings; repr() of it was an 8 MB message
    b'a: &a ["x","x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n'
    b"c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
    b"e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nname: [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
)

# (file bytes, what the message says after the file's name)
BAD_FILES = [
    (b"name: [unclosed\n", ": line 2, column 1: invalid YAML: while parsing a flow sequence"),
    (b"name: t\nepochs:\t3\n", ": line 2, column 8: invalid YAML: while scanning for the next token found "
                                "character '\\t' that cannot start any token"),
    (b"name: a\nepochs: 1\nepochs: 2\n", ": line 3, column 1: invalid YAML: duplicate key 'epochs' (first at line 2)"),
    (b"data: {batch_size: 8, batch_size: 9}\n", ": line 1, column 23: invalid YAML: duplicate key 'batch_size'"),
    (b"", "' is empty (no YAML mapping in it)"),
    (b"# nothing but a comment\n", "' is empty (no YAML mapping in it)"),
    (b"name: caf\xe9\n", "' is not UTF-8 text (byte 0xe9 at offset 9)"),
    (b"name: !!python/object/apply:os.system [echo]\n", ": line 1, column 7: invalid YAML: could not determine a "
                                                      "constructor for the tag"),
    (ALIAS_BOMB, ": expands to more than 100000 values (nested YAML aliases?)"),
]


@pytest.mark.parametrize(("content", "says"), BAD_FILES, ids=[s.split(":")[-1][:30] for _, s in BAD_FILES])
def test_a_bad_config_file_is_one_line_naming_the_file(tmp_path: Path, content: bytes, says: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert says in msg and str(path) in msg, msg
    assert "\n" not in msg and len(msg) <= MAX_MESSAGE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]  # nothing created


def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    """``<<: *anchor`` then an explicit key is YAML's override idiom, not a duplicate."""
    path = tmp_path / "run.yaml"
    path.write_text("name: m\ndata:\n  <<: {name: digits, batch_size: 8}\n  batch_size: 16\n")
    cfg = load_config(path)
    assert cfg.data.name == "digits" and cfg.data.batch_size == 16


def test_a_directory_as_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config file '.*' is a directory; give a YAML file$"):
        load_config(tmp_path)


def test_bad_value_in_a_yaml_file_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("name: t\noptimizer: {name: zosam, rho: 0}\n")
    with pytest.raises(ValueError, match=r"^optimizer\.rho=0 is invalid; must be a number in \(0, inf\)"):
        load_config(path)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n"])
def test_yaml_that_is_not_a_mapping_is_rejected(tmp_path: Path, text: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match="a run config must be a mapping"):
        load_config(path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_are_yaml_scalars_and_create_sections() -> None:
    d = apply_overrides({"optimizer": {"name": "zosam"}},
                        ["optimizer.rho=0.1", "eval.corruptions=null", "seed=3", "data.augment=false",
                         "optimizer.betas=[0.9, 0.99]", "name=a=b"])
    assert d == {"optimizer": {"name": "zosam", "rho": 0.1, "betas": [0.9, 0.99]},
                 "eval": {"corruptions": None}, "seed": 3, "data": {"augment": False}, "name": "a=b"}
    # Plain YAML 1.1 reads 1e-3 as a string; the config's loader reads it as a number.
    assert parse_value("1e-3") == pytest.approx(1e-3)
    assert parse_value("-5E+4") == -5e4
    assert parse_value("1.0e-3") == pytest.approx(1e-3)
    assert parse_value("1e3x") == "1e3x"


def test_exponent_floats_in_yaml_files_are_numbers(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("optimizer: {name: zosam, mu: 1e-3, weight_decay: 5e-4}\n")
    cfg = load_config(path)
    assert cfg.optimizer.hyper["mu"] == pytest.approx(1e-3)
    assert cfg.optimizer.hyper["weight_decay"] == pytest.approx(5e-4)


def test_override_into_a_scalar_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"^override 'epochs.x=1': epochs is not a section"):
        apply_overrides({"epochs": 3}, ["epochs.x=1"])


def test_overrides_apply_on_top_of_the_file() -> None:
    cfg = load_config(CONFIGS[0].parent / "digits.yaml", ["optimizer.rho=0.2", "sparse.density=0.3", "epochs=2"])
    assert cfg.optimizer.hyper["rho"] == 0.2
    assert cfg.sparse.density == 0.3
    assert cfg.epochs == 2
    assert cfg.optimizer.hyper["mu"] == pytest.approx(1e-3)  # untouched keys stay


def test_optimizer_hyperparameters_reach_the_optimizer() -> None:
    import torch

    cfg = load_config(None, [*ZOSAM, "optimizer.rho=0.2", "optimizer.q=2", "optimizer.lr=0.05", "seed=7"])
    opt = cfg.optimizer.build(torch.nn.Linear(3, 2), model=None, default_seed=cfg.seed)
    assert opt.rho == 0.2
    assert opt.q == 2
    assert opt.param_groups[0]["lr"] == 0.05


def test_base_is_the_base_optimizer_alone_and_sgd_a_deprecated_alias() -> None:
    import torch

    from zosam.optim import OPTIMIZERS, FirstOrder

    assert "base" in OPTIMIZERS.names() and "sgd" not in OPTIMIZERS.names()  # messages show the new name
    new = load_config(None, ["optimizer.name=base", "optimizer.base=adamw", "optimizer.lr=0.01"])
    assert isinstance(new.optimizer.build(torch.nn.Linear(3, 2), model=None), FirstOrder)
    with pytest.warns(FutureWarning, match=r"optimizer\.name='sgd' is deprecated; use 'base'"):
        old = load_config(None, ["optimizer.name=sgd", "optimizer.base=adamw", "optimizer.lr=0.01"])
    opt = old.optimizer.build(torch.nn.Linear(3, 2), model=None)
    assert isinstance(opt, FirstOrder) and isinstance(opt.base_optimizer, torch.optim.AdamW)
    assert old.optimizer.hyper == new.optimizer.hyper
    assert RunConfig().optimizer.name == "base"


@pytest.mark.parametrize(("argv", "start"), [
    (["optimizer.rho=0"], "zosam train: error: optimizer.rho=0 is invalid"),
    (["optimizer.nope=1"], "zosam train: error: unknown key optimizer.nope"),
    (["epochs"], "zosam train: error: override 'epochs' is invalid"),
])
def test_cli_bad_override_exits_2_with_one_line(capsys: pytest.CaptureFixture[str], argv: list[str],
                                                start: str) -> None:
    code = main(["train", "--config", str(CONFIGS[0].parent / "digits.yaml"), *argv])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.startswith(start), err
    assert err.count("\n") == 1 and err.endswith("\n")
    assert "Traceback" not in err and out == ""


@pytest.mark.parametrize(("argv", "start"), [
    (["--tracking-uri", "sqlite:////no/such/dir/x.db"], "zosam train: error: --tracking-uri='sqlite:////no/such/dir/x.db'"
                                                        " is invalid; the folder /no/such/dir does not exist"),
    (["--tracking-uri", "http://127.0.0.1:1"], "zosam train: error: --tracking-uri='http://127.0.0.1:1': no MLflow "
                                               "server answers at 127.0.0.1:1 (Connection refused, 5 s timeout)"),
    (["--workers", "-1"], "zosam train: error: --workers=-1 is invalid; must be an integer in [0, inf)"),
    (["eval.corruptions=/no/such/set"], "zosam train: error: eval.corruptions='/no/such/set' is invalid: no "
                                        "CIFAR-10-C set at '/no/such/set'"),
])
def test_cli_bad_environment_exits_2_before_any_work(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, argv: list[str],
                                                     start: str) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    t0 = time.perf_counter()
    code = main(["train", "--config", str(CONFIGS[0].parent / "digits.yaml"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(start) and err.count("\n") == 1, err
    assert time.perf_counter() - t0 < 20  # the URI check times out after 5 s; nothing trains
    assert not Path("/no/such").exists()
    assert list(tmp_path.iterdir()) == []  # no store, no checkpoint folder


def test_cli_batch_larger_than_the_data_names_batch_size(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--config", str(CONFIGS[0].parent / "digits.yaml"), "data.batch_size=100000",
                 "tracking.enabled=false"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("zosam train: error: data.batch_size=100000 is invalid; it is larger than"), err


def test_cli_keeps_the_traceback_of_anything_but_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only ``ConfigError`` is exit 2: a ``ValueError`` from a bug propagates with its traceback."""
    import zosam.runner

    def broken(*args, **kwargs):
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr(zosam.runner, "run", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["train", "--config", str(CONFIGS[0].parent / "digits.yaml")])


def test_cli_missing_config_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["train", "--config", str(tmp_path / "nope.yaml")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("zosam train: error: config file") and err.count("\n") == 1
