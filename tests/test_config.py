"""Run config: every shipped config validates; bad input is a ValueError naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from zosam.cli import main
from zosam.config import RunConfig, apply_overrides, load_config, parse_value
from zosam.validate import ConfigError

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
]


@pytest.mark.parametrize(("overrides", "start"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_input_is_a_value_error_naming_the_field(overrides: list[str], start: str) -> None:
    with pytest.raises(ValueError) as info:
        load_config(None, ["model.name=tiny_cnn", *overrides])  # a cheap model; later overrides win
    msg = str(info.value)
    assert msg.startswith(start), msg
    assert "\n" not in msg


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


def test_cli_missing_config_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["train", "--config", str(tmp_path / "nope.yaml")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("zosam train: error: config file") and err.count("\n") == 1
