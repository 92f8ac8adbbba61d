"""The evidence benchmarks (accuracy, robustness, convergence): aggregation by hand, and
one real end-to-end chain on digits (two runs of two steps, a tiny generated set)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from zosam.bench import accuracy, convergence, robustness


def _rec(host: str, opt: str, density: float, seed: int, acc: float | None, *, curve=None, times=None,
         status: str = "finished", bwd: int = 10, fwd: int = 10, fwd_ng: int = 0, t: float = 1.0) -> dict:
    curve = curve or [acc]
    return {"host": host, "optimizer": opt, "density": density, "seed": seed, "status": status,
            "summary": {} if status != "finished" else
            {"final_test_acc": acc, "train_time_s": t, "passes_backward": bwd, "passes_forward": fwd,
             "passes_forward_no_grad": fwd_ng},
            "history": [{"epoch": i + 1, "test_acc": a, "epoch_time_s": (times or [1.0] * len(curve))[i]}
                        for i, a in enumerate(curve)]}


# -- accuracy ---------------------------------------------------------------------------------------
def test_accuracy_aggregate_by_hand() -> None:
    recs = [_rec("rigl", "sgd", 0.1, 0, 0.50, t=2.0), _rec("rigl", "sgd", 0.1, 1, 0.60, t=3.0),
            _rec("rigl", "zosam", 0.1, 0, 0.55, fwd_ng=20), _rec("rigl", "zosam", 0.1, 1, 0.65, fwd_ng=20),
            _rec("rigl", "zosam", 0.1, 2, 0.75, fwd_ng=20), _rec("rigl", "sam", 0.1, 0, None, status="failed"),
            _rec("snip", "sam", 0.02, 0, 0.30, bwd=20)]
    rows = {r["method"]: r for r in accuracy.aggregate(recs)}
    sgd, zo = rows["rigl+sgd@0.1"], rows["rigl+zosam@0.1"]
    assert sgd["acc_mean"] == pytest.approx(55.0)
    assert sgd["acc_std"] == pytest.approx(math.sqrt(50.0))  # (5^2 + 5^2) / (2 - 1), in points
    assert sgd["train_time_s"] == pytest.approx(5.0)
    assert (zo["acc_mean"], zo["acc_std"], zo["acc_min"], zo["acc_max"]) == pytest.approx((65.0, 10.0, 55.0, 75.0))
    assert zo["vs_sgd"] == pytest.approx(10.0)
    assert zo["fwd_per_run"] == 30 and zo["bwd_per_run"] == 10
    assert rows["rigl+sam@0.1"]["seeds"] == 0 and rows["rigl+sam@0.1"]["failed"] == 1
    assert "acc_mean" not in rows["rigl+sam@0.1"] and rows["rigl+sam@0.1"]["vs_sgd"] == ""
    one = rows["snip+sam@0.02"]
    assert one["acc_std"] == "" and one["sparsity_%"] == 98 and one["vs_sgd"] == ""  # no SGD cell to compare


def test_accuracy_settings_and_grid() -> None:
    args = accuracy.build_parser().parse_args(["--seeds", "3", "--width", "0", "--optimizers", "sgd", "rwp"])
    s = accuracy.settings(args)
    assert s["seeds"] == 3 and s["width"] is None and s["epochs"] == accuracy.REDUCED["epochs"]
    configs = accuracy.grid(args, s)
    assert len(configs) == 3 * 2 * 2 * 2 and len({c["name"] for c in configs}) == len(configs)
    full = accuracy.settings(accuracy.build_parser().parse_args(["--full"]))
    assert (full["epochs"], full["train_subset"], full["model"], full["width"], full["seeds"]) == \
        (160, None, "resnet32", 32, 3)
    with pytest.raises(ValueError, match="optimizer='adam' is invalid"):
        accuracy.run_config(s, dataset="digits", host="rigl", optimizer="adam", density=0.1, seed=0)


def test_full_sweep_specs_are_exact_grids(tmp_path: Path) -> None:
    from zosam.sweep import load_spec

    args = accuracy.build_parser().parse_args(["--full", "--sweep", "--device", "cuda"])
    specs = accuracy.sweep_specs(args, accuracy.settings(args))
    assert [s["name"] for s in specs] == [f"accuracy-full-{o}" for o in ("sgd", "sam", "zosam", "rwp")]
    for raw in specs:
        path = tmp_path / f"{raw['name']}.yaml"
        path.write_text(yaml.safe_dump(raw))
        spec = load_spec(path)  # validates every grid point as a run config
        points = spec.search["points_to_evaluate"]
        assert spec.num_trials == len(points) == 2 * 2 * 3
        assert {(p["sparse.method"], p["sparse.density"], p["seed"]) for p in points} == \
            {(h, d, s) for h in ("snip", "rigl") for d in (0.1, 0.02) for s in range(3)}
        assert spec.scheduler["type"] == "none" and spec.base["epochs"] == 160


def test_estimate_seconds() -> None:
    s = {"epochs": 2, "train_subset": 640, "batch_size": 64}
    assert accuracy.estimate_seconds(s, {"sgd": 2, "sam": 1}, 0.5) == pytest.approx(20 * 0.5 * (2 + 2))


# -- convergence -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("curve", "threshold", "expected"), [
    ([0.1, 0.3, 0.5, 0.4], 0.3, 2), ([None, 0.6], 0.5, 2), ([0.1, 0.2], 0.5, None), ([0.5], 0.5, 1)])
def test_first_crossing(curve, threshold, expected) -> None:
    assert convergence.first_crossing(curve, threshold) == expected


def test_convergence_aggregate_by_hand() -> None:
    recs = [_rec("rigl", "sgd", 0.1, 0, 0.6, curve=[0.2, 0.45, 0.6], times=[1.0, 2.0, 4.0]),
            _rec("rigl", "sgd", 0.1, 1, 0.5, curve=[0.2, 0.3, 0.5], times=[1.0, 1.0, 1.0]),
            _rec("rigl", "zosam", 0.1, 0, 0.3, curve=[0.1, 0.2, 0.3]),
            _rec("rigl", "zosam", 0.1, 1, 0.3, curve=[0.1, 0.2, 0.3])]
    assert convergence.default_threshold(recs, 0.8) == pytest.approx(0.8 * 0.55)
    rows = {r["optimizer"]: r for r in convergence.aggregate(recs, 0.44)}
    sgd = rows["sgd"]
    assert sgd["reached"] == "2/2" and sgd["epochs"] == pytest.approx(2.5)  # epochs 2 and 3
    assert sgd["time_s"] == pytest.approx((3.0 + 3.0) / 2)  # 1 + 2, and 1 + 1 + 1
    assert sgd["epochs_mean_curve"] == 3  # seed means 0.2, 0.375, 0.55
    zo = rows["zosam"]
    assert zo["reached"] == "0/2" and zo["epochs"] == convergence.NOT_REACHED == zo["epochs_mean_curve"]


# -- robustness ------------------------------------------------------------------------------------
def test_robustness_aggregate_by_hand() -> None:
    runs = [{"host": "snip", "optimizer": "zosam", "density": 0.1, "seed": s,
             "blocks": {"clean": clean, "fog.1": a, "fog.2": b, "snow.1": c, "snow.2": d}}
            for s, (clean, a, b, c, d) in enumerate([(0.9, 0.8, 0.6, 0.7, 0.5), (0.8, 0.6, 0.4, 0.6, 0.2)])]
    assert robustness.corrupted_mean(runs[0]["blocks"]) == pytest.approx(0.65)
    (row,) = robustness.aggregate(runs, [1, 2])
    assert row["clean"] == pytest.approx(85.0) and row["corrupted"] == pytest.approx((65.0 + 45.0) / 2)
    assert row["gap"] == pytest.approx(30.0) and row["gap_std"] == pytest.approx(math.sqrt(50.0))  # gaps 25, 35
    assert row["sev1"] == pytest.approx((75.0 + 60.0) / 2) and row["sev2"] == pytest.approx((55.0 + 30.0) / 2)


# -- end to end on real data --------------------------------------------------------------------------
def _json_line(text: str) -> dict:
    return json.loads([ln for ln in text.splitlines() if ln.startswith("{")][-1])


def test_end_to_end_on_digits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "acc"
    argv = ["--dataset", "digits", "--model", "tiny_cnn", "--width", "0", "--epochs", "2",
            "--max-steps-per-epoch", "1", "--seeds", "1", "--hosts", "rigl", "--optimizers", "sgd", "zosam",
            "--densities", "0.5", "--train-subset", "200", "--test-subset", "100", "--out", str(out), "--quiet"]
    accuracy.main(argv)
    line = _json_line(capsys.readouterr().out)
    assert line["benchmark"] == "accuracy" and line["runs"] == 2 and line["failed"] == 0
    results = json.loads((out / accuracy.RESULTS_FILE).read_text())
    assert [len(r["history"]) for r in results["records"]] == [2, 2]
    zo = next(r for r in results["records"] if r["optimizer"] == "zosam")
    assert zo["summary"]["passes_backward"] == 2 and zo["summary"]["passes_forward_no_grad"] == 4
    assert Path(zo["checkpoint"]).is_file() and zo["run_id"]
    row = next(r for r in line["rows"] if r["optimizer"] == "zosam")
    assert row["acc_mean"] == pytest.approx(100 * zo["summary"]["final_test_acc"])

    # A second call reuses the recorded runs: same run ids, nothing retrained.
    accuracy.main(argv)
    again = json.loads((out / accuracy.RESULTS_FILE).read_text())
    assert [r["run_id"] for r in again["records"]] == [r["run_id"] for r in results["records"]]
    capsys.readouterr()

    convergence.main(["--results", str(out / accuracy.RESULTS_FILE), "--threshold", "0.01"])
    conv = _json_line(capsys.readouterr().out)
    assert conv["benchmark"] == "convergence" and conv["threshold"] == 0.01
    assert all(r["reached"] == "1/1" for r in conv["rows"])

    robustness.main(["--results", str(out / accuracy.RESULTS_FILE), "--images", "20",
                     "--corruptions", "contrast", "--severities", "2"])
    rob = _json_line(capsys.readouterr().out)
    assert rob["set_label"] == "CIFAR-10-C-style (generated)" and rob["images"] == 20
    for r in rob["rows"]:
        assert r["gap"] == pytest.approx(r["clean"] - r["corrupted"]) and r["sev2"] == pytest.approx(r["corrupted"])
