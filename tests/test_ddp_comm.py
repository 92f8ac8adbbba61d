"""The DDP communication benchmark counts what each method reduces, on 2 real gloo ranks."""

from __future__ import annotations

import pytest

from zosam.bench import ddp_comm

pytestmark = pytest.mark.distributed


def test_sam_reduces_the_gradient_twice_zosam_once_plus_2q_scalars() -> None:
    args = ddp_comm.build_parser().parse_args(
        ["--model", "mlp", "--batch-size", "4", "--steps", "2", "--methods", "sgd", "sam", "zosam:q=2"])
    got = ddp_comm.measure(args)
    rows = {r["method"]: r for r in got["rows"]}
    grad_mb = got["parameters"] * 4 / 1e6  # float32 gradients, every parameter
    assert rows["sgd"]["grad allreduce MB"] == pytest.approx(grad_mb)
    assert rows["sam"]["grad allreduce MB"] == pytest.approx(2 * grad_mb)
    zo = rows["zosam:q=2"]
    assert zo["grad allreduce MB"] == pytest.approx(grad_mb)
    assert zo["scalar allreduces"] == 2 * 2 and zo["scalar bytes"] == 4 * 2 * 2  # 2q float32 query losses
    assert rows["sgd"]["scalar allreduces"] == rows["sam"]["scalar allreduces"] == 0
    assert all(r["buffer bcast MB"] == 0 for r in rows.values())  # an MLP has no buffers
