"""The sparse-overhead benchmark runs end to end and prints a table and one JSON line."""

from __future__ import annotations

import json

import pytest

from zosam.bench.sparse_overhead import main


def test_benchmark_prints_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--width", "4", "--batch-size", "2", "--densities", "0.5", "0.1",
            "--repeats", "1", "--update-repeats", "2", "--warmup", "0", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    res = json.loads(lines[-1])
    assert res["benchmark"] == "sparse_overhead" and res["device"] == "cpu"
    assert [r["density"] for r in res["results"]] == [0.5, 0.1]
    for r in res["results"]:
        assert r["realised_density"] == pytest.approx(r["density"], abs=1e-4)
        assert set(r["update_s"]) == {"rigl", "set", "mest"}
        assert r["apply_frac"] == pytest.approx(r["apply_s"] / res["sgd_step_s"])
    assert any(line.strip().startswith("90%") for line in lines)  # the table's 0.1 row
