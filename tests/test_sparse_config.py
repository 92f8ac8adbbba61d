"""SparsityConfig: defaults, round trip, and one clear ValueError per bad field."""

from __future__ import annotations

import pytest

from zosam.sparse import METHODS, SparsityConfig


def test_defaults_are_valid_and_round_trip() -> None:
    cfg = SparsityConfig.from_dict({"method": "rigl", "density": 0.05})
    assert cfg.is_dynamic and not cfg.is_dense
    assert cfg.sparsity == pytest.approx(0.95)
    assert SparsityConfig.from_dict(cfg.to_dict()) == cfg
    assert SparsityConfig.from_dict(None) == SparsityConfig()
    assert SparsityConfig().is_dense and SparsityConfig().sparsity == 0.0


@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_accepted(method: str) -> None:
    assert SparsityConfig.from_dict({"method": method}).method == method


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("density", 0.0, "must be a number in (0, 1]"),
        ("density", 1.5, "must be a number in (0, 1]"),
        ("density", -0.1, "must be a number in (0, 1]"),
        ("density", "0.5", "must be a number in (0, 1]"),
        ("density", float("nan"), "must be a number in (0, 1]"),
        ("method", "lottery", "allowed:"),
        ("distribution", "erdos", "allowed:"),
        ("drop_schedule", "step", "allowed:"),
        ("update_interval", -1, "must be an integer in [1, inf)"),
        ("update_interval", 0, "must be an integer in [1, inf)"),
        ("update_interval", 2.5, "must be an integer in [1, inf)"),
        ("drop_fraction", 1.0, "must be a number in [0, 1)"),
        ("drop_fraction", -0.01, "must be a number in [0, 1)"),
        ("end_fraction", 0.0, "must be a number in (0, 1]"),
        ("power_scale", 0.0, "must be a number in (0, inf)"),
        ("dense_first_layer", "yes", "must be true or false"),
        ("global_threshold", 1, "must be true or false"),
        ("prune_batches", 0, "must be an integer in [1, inf)"),
        ("synflow_iterations", 0, "must be an integer in [1, inf)"),
        ("grasp_samples_per_class", 0, "must be an integer in [1, inf)"),
        ("grasp_temperature", -1.0, "must be a number in (0, inf)"),
        ("mest_gradient_weight", -1.0, "must be a number in [0, inf)"),
    ],
)
def test_bad_field_raises_naming_it(field: str, value: object, fragment: str) -> None:
    with pytest.raises(ValueError) as err:
        SparsityConfig.from_dict({"method": "rigl", field: value})
    msg = str(err.value)
    assert msg.startswith(f"sparse.{field}=")
    assert fragment in msg


def test_density_message_is_exact() -> None:
    with pytest.raises(ValueError, match=r"^sparse\.density=1\.5 is invalid; must be a number in \(0, 1\]$"):
        SparsityConfig(density=1.5)


def test_unknown_key_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown key sparse\.densty; allowed: "):
        SparsityConfig.from_dict({"densty": 0.1})


def test_host_names_come_from_the_registries() -> None:
    """One list of hosts: the pruners' and the DST rules' registries (no second copy)."""
    from zosam.sparse import DST_RULES, DYNAMIC_METHODS, PRUNERS, STATIC_METHODS

    assert STATIC_METHODS == ("grasp", "magnitude", "random", "snip", "synflow") == tuple(PRUNERS.names())
    assert DYNAMIC_METHODS == ("dsr", "mest", "rigl", "set") == tuple(DST_RULES.names())
    assert ("dense", *STATIC_METHODS, *DYNAMIC_METHODS) == METHODS
    for method in METHODS:
        cfg = SparsityConfig(method=method)
        assert cfg.is_dynamic == (method in DST_RULES) and cfg.is_dense == (method == "dense")
    with pytest.raises(ValueError, match=r"sparse\.method='lottery' is invalid; allowed: 'dense', 'grasp', "):
        SparsityConfig(method="lottery")
