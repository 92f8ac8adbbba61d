"""``zosam compare`` on real runs: six tiny digits trainings in a temporary sqlite store.

Experiment ``cmp-a``: SGD and ZO-SAM (RigL, 50 %), seeds 0 and 1 (four runs).
Experiment ``cmp-b``: a sweep parent (``zosam.role=sweep``) with three ZO-SAM children that
differ in rho, logged the way ``zosam.sweep`` logs them (parent run id + sweep tags); the
third is stopped after its first epoch the way Ray Tune stops a trial (``SystemExit(0)``).
The expected numbers are computed independently with ``mlflow.search_runs``.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import pytest

from zosam.cli import main
from zosam.compare import (
    Group,
    NothingSelected,
    RunRecord,
    Selection,
    compare,
    display_columns,
    group_runs,
    key_columns,
    parse_tags,
    table_rows,
    varying_params,
)
from zosam.compare.plots import (
    accuracy_vs_cost_figure,
    accuracy_vs_sparsity_figure,
    learning_curves_figure,
    parallel_coordinates_figure,
)
from zosam.config import RunConfig
from zosam.pareto import pareto_front
from zosam.runner import run
from zosam.tracking import RunLogger

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("accuracy_vs_sparsity.png", "accuracy_vs_cost.png", "parallel_coordinates.png", "learning_curves.png")


def _cfg(name: str, optimizer: dict, seed: int, uri: str, experiment: str, ckpt: Path) -> RunConfig:
    return RunConfig.from_dict({
        "name": name, "seed": seed, "epochs": 2, "max_steps_per_epoch": 4, "device": "cpu",
        "data": {"name": "digits", "batch_size": 32, "eval_batch_size": 256, "test_subset": 100,
                 "image_size": 16},
        "model": {"name": "tiny_cnn", "width": 8},
        "optimizer": {"lr": 0.3, **optimizer},  # moves off chance in 8 steps: seeds differ
        "sparse": {"method": "rigl", "density": 0.5, "update_interval": 2},
        "checkpoint": {"dir": str(ckpt / name)},
        "tracking": {"uri": uri, "experiment": experiment},
    })


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    ckpt = root / "ckpt"
    zosam = {"name": "zosam", "rho": 0.05, "mu": 1e-3, "q": 1}
    for opt in ({"name": "base"}, zosam):
        for seed in (0, 1):
            out = run(_cfg(f"{opt['name']}-s{seed}", opt, seed, uri, "cmp-a", ckpt), log=None)
            assert out.status == "finished"
    parent = RunLogger(uri, "cmp-b", "mysweep", tags={"zosam.sweep": "mysweep", "zosam.role": "sweep"})
    children = []
    for i, rho in enumerate((0.05, 0.1)):
        out = run(_cfg(f"mysweep-t{i}", {**zosam, "rho": rho}, 0, uri, "cmp-b", ckpt), log=None,
                  parent_run_id=parent.run_id, extra_tags={"zosam.sweep": "mysweep", "zosam.trial_id": f"t{i}"})
        assert out.status == "finished", out.reason
        children.append(out.run_id)

    def stop(trainer, res, path, logger) -> None:  # as Ray Tune stops a trial inside its report
        sys.exit(0)

    with pytest.raises(SystemExit):
        run(_cfg("mysweep-t2", {**zosam, "rho": 0.2}, 0, uri, "cmp-b", ckpt), log=None, on_epoch=stop,
            parent_run_id=parent.run_id, extra_tags={"zosam.sweep": "mysweep", "zosam.trial_id": "t2"})
    parent.end("finished")
    return {"uri": uri, "root": root, "parent": parent.run_id, "children": children}


@contextlib.contextmanager
def tracking(uri: str):
    """``mlflow.search_runs`` reads the global tracking URI: set it here only."""
    import mlflow

    old = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield mlflow
    finally:
        mlflow.set_tracking_uri(old)


def _expected_by_optimizer(uri: str, experiment: str) -> dict[str, dict]:
    """Mean and sample std of the summary metrics per optimizer, from mlflow.search_runs."""
    with tracking(uri) as mlflow:
        df = mlflow.search_runs(experiment_names=[experiment])
    out = {}
    for opt, sub in df.groupby("tags.zosam.optimizer"):
        out[opt] = {
            "n": len(sub),
            "run_ids": set(sub["run_id"]),
            "seeds": sorted(sub["tags.zosam.seed"]),
            **{f"{m}_mean": float(sub[f"metrics.{m}"].mean()) for m in
               ("final_test_acc", "best_test_acc", "wall_time_s", "passes_backward", "images_per_s")},
            **{f"{m}_std": float(sub[f"metrics.{m}"].std(ddof=1)) for m in
               ("final_test_acc", "wall_time_s", "images_per_s")},
            "final": list(sub["metrics.final_test_acc"]),
        }
    return out


@pytest.fixture(scope="module")
def exported(store: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("exports")
    lines: list[str] = []
    result = compare(Selection(experiment="cmp-a"), tracking_uri=store["uri"], out=out, log=True,
                     echo=lines.append)
    return {"result": result, "out": out, "printed": "\n".join(lines)}


def test_groups_match_the_runs_own_metrics(store: dict, exported: dict) -> None:
    expected = _expected_by_optimizer(store["uri"], "cmp-a")
    groups = exported["result"].groups
    assert [g.value("optimizer") for g in groups] == ["base", "zosam"]
    for g in groups:
        e = expected[g.value("optimizer")]
        assert {r.run_id for r in g.runs} == e["run_ids"]
        assert len(g.completed) == e["n"] == 2
        assert g.seeds == e["seeds"] == ["0", "1"]
        assert g.mean("final_test_acc") == pytest.approx(e["final_test_acc_mean"], abs=1e-12)
        assert g.std("final_test_acc") == pytest.approx(e["final_test_acc_std"], abs=1e-12)
        assert g.std("final_test_acc") == pytest.approx(statistics.stdev(e["final"]), abs=1e-12)
        for m in ("best_test_acc", "wall_time_s", "passes_backward", "images_per_s"):
            assert g.mean(m) == pytest.approx(e[f"{m}_mean"], rel=1e-12)
        # Timings differ from run to run, so these catch runs put in the wrong group.
        for m in ("wall_time_s", "images_per_s"):
            assert g.std(m) == pytest.approx(e[f"{m}_std"], rel=1e-9)
    # The printed table carries the same numbers, in percent.
    printed = exported["printed"]
    for g in groups:
        e = expected[g.value("optimizer")]
        assert f"{100 * e['final_test_acc_mean']:.2f} ± {100 * e['final_test_acc_std']:.2f}" in printed
    assert "best-epoch acc %" in printed and "4 runs (4 completed) in 2 groups" in printed


def test_csv_and_markdown_exports(store: dict, exported: dict) -> None:
    expected = _expected_by_optimizer(store["uri"], "cmp-a")
    out: Path = exported["out"]
    with (out / "comparison.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["optimizer"] for r in rows] == ["base", "zosam"]
    for r in rows:
        e = expected[r["optimizer"]]
        assert (r["host"], r["density"], r["dataset"], r["model"]) == ("rigl", "0.5", "digits", "tiny_cnn")
        assert int(r["n_seeds"]) == 2 and r["seeds"] == "0 1"
        assert float(r["final_test_acc_mean"]) == pytest.approx(e["final_test_acc_mean"], abs=1e-12)
        assert float(r["final_test_acc_std"]) == pytest.approx(e["final_test_acc_std"], abs=1e-12)
        assert float(r["passes_backward_mean"]) == pytest.approx(e["passes_backward_mean"])
        assert set(r["run_ids"].split()) == e["run_ids"]
    assert rows[1]["optimizer.rho"] == "0.05" and rows[0]["optimizer.rho"] == ""
    with (out / "runs.csv").open() as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 4 and {r["seed"] for r in runs} == {"0", "1"}
    md = (out / "comparison.md").read_text().splitlines()
    table = [line for line in md if line.startswith("|")]
    assert table[0].startswith("| optimizer | host | density | rho | mu | q | n seeds |")
    assert "best-epoch acc %" in table[0]
    assert len(table) == 4  # header, rule, two groups
    e = expected["zosam"]
    assert table[3].startswith("| zosam | rigl | 0.5 | 0.05 | 0.001 | 1 | 2 |")
    assert f"{100 * e['final_test_acc_mean']:.2f} ± {100 * e['final_test_acc_std']:.2f}" in table[3]


@pytest.mark.parametrize("name", PLOTS)
def test_plots_are_valid_pngs(exported: dict, name: str) -> None:
    from PIL import Image

    path = exported["out"] / name
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 200 and im.height > 200


def test_comparison_run_holds_the_artifacts(store: dict, exported: dict) -> None:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(store["uri"])
    run_id = exported["result"].comparison_run_id
    r = c.get_run(run_id)
    assert r.data.tags["zosam.role"] == "comparison"
    assert r.info.status == "FINISHED"
    assert c.get_experiment(r.info.experiment_id).name == "cmp-a"
    assert r.data.metrics["n_runs"] == 4 and r.data.metrics["n_groups"] == 2
    top = {a.path for a in c.list_artifacts(run_id)}
    assert {"comparison.csv", "runs.csv", "comparison.md", "plots"} <= top
    assert {a.path for a in c.list_artifacts(run_id, "plots")} == {f"plots/{p}" for p in PLOTS}
    # A second comparison of the same experiment does not count the first as a run.
    again = compare(Selection(experiment="cmp-a"), tracking_uri=store["uri"], log=False, echo=None)
    assert sum(len(g.runs) for g in again.groups) == 4


@pytest.mark.parametrize("sweep_by", ["name", "parent_id"])
def test_sweep_selects_only_its_children(store: dict, sweep_by: str) -> None:
    sweep = "mysweep" if sweep_by == "name" else store["parent"]
    lines: list[str] = []
    result = compare(Selection(sweep=sweep), tracking_uri=store["uri"], log=False, echo=lines.append)
    ids = [r.run_id for g in result.groups for r in g.runs]
    stopped = [r for g in result.groups for r in g.stopped_early]
    assert len(stopped) == 1 and stopped[0].name == "mysweep-t2"
    assert sorted(ids) == sorted([*store["children"], stopped[0].run_id])
    assert store["parent"] not in ids
    # rho differs between the children: three groups of one run each, keyed by it.
    assert [g.value("optimizer.rho") for g in result.groups] == ["0.05", "0.1", "0.2"]
    assert all(math.isnan(g.std("final_test_acc")) for g in result.groups)
    # The trial stopped early: not in the statistics, shown with its last accuracy and epoch.
    g = result.groups[2]
    assert g.completed == [] and math.isnan(g.mean("final_test_acc"))
    assert stopped[0].last_epoch == 1 and stopped[0].tags["zosam.status"] == "stopped_early"
    with tracking(store["uri"]) as mlflow:
        history = mlflow.MlflowClient().get_metric_history(stopped[0].run_id, "test_acc")
    assert [m.step for m in history] == [1]
    printed = "\n".join(lines)
    assert "3 runs (2 completed, 1 stopped early) in 3 groups" in printed
    assert "stopped early: last acc % @ epoch" in printed
    row = next(line for line in printed.splitlines() if line.startswith("zosam") and " 0.2 " in line)
    assert row.endswith(f"{100 * history[0].value:.2f} @ 1") and "0 (of 1 runs)" in row


def test_tag_and_filter_selections(store: dict) -> None:
    uri = store["uri"]
    by_tag = compare(Selection(tags=parse_tags(["optimizer=base"])), tracking_uri=uri, log=False, echo=None)
    assert [g.value("optimizer") for g in by_tag.groups] == ["base"]
    by_filter = compare(Selection(filter="params.seed = '1'"), tracking_uri=uri, log=False, echo=None)
    runs = [r for g in by_filter.groups for r in g.runs]
    assert len(runs) == 2 and {r.tags["zosam.seed"] for r in runs} == {"1"}


@pytest.mark.parametrize(("argv", "words"), [
    (["--tag", "host=set"], ["no runs match", "zosam.host='set'"]),
    (["--filter", "params.seed = '7'"], ["no runs match", "params.seed = '7'"]),
    (["--experiment", "nope"], ["no experiment named 'nope'"]),
    (["--sweep", "nope"], ["no sweep named 'nope'"]),
    (["--experiment", "cmp-a", "--sweep", "mysweep"], ["no sweep named 'mysweep'"]),
])
def test_empty_selection_says_so(store: dict, capsys: pytest.CaptureFixture, argv: list[str],
                                 words: list[str]) -> None:
    rc = main(["compare", "--tracking-uri", store["uri"], "--no-log", *argv])
    err = capsys.readouterr().err
    assert rc == 1
    for w in words:
        assert w in err


def test_bad_filter_and_tag_are_argument_errors(store: dict, capsys: pytest.CaptureFixture) -> None:
    assert main(["compare", "--tracking-uri", store["uri"], "--no-log", "--filter", "params.seed ==="]) == 2
    assert "MLflow rejected the filter" in capsys.readouterr().err
    assert main(["compare", "--tracking-uri", store["uri"], "--no-log", "--tag", "novalue"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_out_that_is_a_file_and_an_unreachable_server_are_one_line_errors(
        store: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    existing = tmp_path / "existing"
    existing.write_text("keep me")
    assert main(["compare", "--tracking-uri", store["uri"], "--no-log", "--out", str(existing)]) == 2
    err = capsys.readouterr().err
    assert err == f"zosam compare: error: --out='{existing}' is an existing file; give a folder (new or existing)\n"
    assert existing.read_text() == "keep me"
    t0 = time.perf_counter()
    assert main(["compare", "--tracking-uri", "http://127.0.0.1:1", "--no-log"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zosam compare: error: --tracking-uri='http://127.0.0.1:1': no MLflow server answers at "
                          "127.0.0.1:1") and err.count("\n") == 1, err
    assert time.perf_counter() - t0 < 10  # MLflow's own retries took minutes


def test_missing_sqlite_store_is_not_created(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'absent.db'}"
    with pytest.raises(NothingSelected, match="no MLflow store"):
        compare(Selection(), tracking_uri=uri, log=False, echo=None)
    assert not (tmp_path / "absent.db").exists()


def _run_count(uri: str) -> int:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    ids = [e.experiment_id for e in c.search_experiments()]
    return len(c.search_runs(ids, max_results=1000))


def test_looking_is_not_writing(store: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    uri = store["uri"]
    before = _run_count(uri)
    assert main(["compare", "--tracking-uri", uri, "--experiment", "cmp-a"]) == 0
    assert _run_count(uri) == before
    with warnings.catch_warnings(record=True) as caught:  # pytest would otherwise keep them off stderr
        warnings.simplefilter("always")
        assert main(["compare", "--tracking-uri", uri, "--experiment", "cmp-a", "--out", str(tmp_path / "a")]) == 0
    assert [str(w.message) for w in caught if "matplotlib" in w.filename or "zosam" in w.filename
            or "layout" in str(w.message).lower()] == []
    assert _run_count(uri) == before  # the exports are written, the store is not
    assert (tmp_path / "a" / "comparison.csv").is_file()
    printed = capsys.readouterr()
    assert "comparison run" not in printed.out
    assert printed.err == ""  # no matplotlib (or other) warning reaches the terminal
    assert main(["compare", "--tracking-uri", uri, "--experiment", "cmp-a", "--log"]) == 0
    assert _run_count(uri) == before + 1
    assert "comparison run" in capsys.readouterr().out


# ----------------------------------------------------------------------------- pure parts

def _record(i: int, seed: int, acc: float, **params: str) -> RunRecord:
    tags = {"zosam.optimizer": params.pop("opt", "zosam"), "zosam.host": "rigl", "zosam.density": "0.1",
            "zosam.dataset": "cifar10", "zosam.model": "resnet32", "zosam.seed": str(seed)}
    return RunRecord(f"r{i}", f"run{i}", "0", tags, {"seed": str(seed), "name": f"run{i}", **params},
                     {"final_test_acc": acc})


def test_grouping_by_hand() -> None:
    runs = [_record(0, 0, 0.5, **{"optimizer.rho": "0.05"}), _record(1, 1, 0.7, **{"optimizer.rho": "0.05"}),
            _record(2, 0, 0.6, **{"optimizer.rho": "0.1"}),
            _record(3, 0, 0.2, opt="sgd", **{"optimizer.rho": "0.05", "sparse.update_interval": "50"})]
    # seed and name differ but are not searched; update_interval differs (absent elsewhere).
    assert varying_params(runs) == ["optimizer.rho", "sparse.update_interval"]
    assert key_columns(runs)[-1] == "sparse.update_interval"
    groups = group_runs(runs)
    assert [(g.value("optimizer"), g.value("optimizer.rho"), len(g.runs)) for g in groups] == \
        [("sgd", "0.05", 1), ("zosam", "0.05", 2), ("zosam", "0.1", 1)]
    g: Group = groups[1]
    assert g.mean("final_test_acc") == pytest.approx(0.6)
    assert g.std("final_test_acc") == pytest.approx(math.sqrt(((0.5 - 0.6) ** 2 + (0.7 - 0.6) ** 2) / 1))


def test_pareto_front_by_hand() -> None:
    # (cost, accuracy): 1 is dominated by 0 (cheaper, as good), 3 by 2.
    pts = [(1.0, 0.8), (2.0, 0.8), (3.0, 0.9), (4.0, 0.85), (5.0, 0.95), (0.5, 0.1)]
    assert sorted(pareto_front(pts, ("min", "max")), key=lambda i: pts[i][0]) == [5, 0, 2, 4]


def test_parse_tags() -> None:
    assert parse_tags(["host=rigl", "mlflow.user=a=b"]) == {"zosam.host": "rigl", "mlflow.user": "a=b"}
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_tags(["=x"])



def test_table_rounds_to_meaningful_digits() -> None:
    runs = [_record(0, 0, 0.61234, **{"optimizer.rho": "0.08171890156969401", "optimizer.mu": "0.0012345678"}),
            _record(1, 1, 0.65678, **{"optimizer.rho": "0.08171890156969401", "optimizer.mu": "0.0012345678"}),
            _record(2, 0, 0.5, **{"optimizer.rho": "0.0817189", "optimizer.mu": "0.001"}),
            _record(3, 0, 0.4, **{"optimizer.rho": "0.05", "optimizer.mu": "0.001"})]
    groups = group_runs(runs)
    header, rows = table_rows(groups, display_columns(groups, key_columns(runs)))
    rho, mu, acc = (header.index(h) for h in ("rho", "mu", "final acc % (mean ± std)"))
    # Three significant digits, more only where two different values would print alike.
    assert sorted(r[rho] for r in rows) == ["0.05", "0.0817189", "0.081718902"]
    assert sorted(r[mu] for r in rows) == ["0.001", "0.001", "0.00123"]
    ok = next(r for r in rows if r[mu] == "0.00123")
    accs = [0.61234, 0.65678]
    assert ok[acc] == f"{100 * statistics.fmean(accs):.2f} ± {100 * statistics.stdev(accs):.2f}" == "63.46 ± 3.14"
    assert next(r for r in rows if r[rho] == "0.05")[acc] == "40.00 ± n/a"


def _many_groups(n: int = 24) -> tuple[list[Group], list[str], dict[str, list[tuple[int, float]]]]:
    runs = []
    for i in range(n):
        params = {"optimizer.rho": str(0.01 + i / 997), "optimizer.mu": str(1e-3 * (1 + i / 7)),
                  "sparse.update_interval_with_a_long_name": str(10 * i), "data.label_noise": str(i % 3 / 10)}
        runs += [_record(2 * i, 0, 0.5 + i / 100, **params), _record(2 * i + 1, 1, 0.52 + i / 100, **params)]
        for r in runs[-2:]:
            r.metrics.update(train_time_s=1.0 + i / 3 + int(r.tags["zosam.seed"]), best_test_acc=0.6)
    runs[-1].metrics.pop("final_test_acc")
    runs[-1].tags["zosam.status"], runs[-1].last_epoch = "stopped_early", 2
    runs[-1].metrics["test_acc"] = 0.3
    histories = {r.run_id: [(e, 0.1 * e + i / 100) for e in range(1, 4 if r.completed else 3)]
                 for i, r in enumerate(runs)}
    columns = key_columns(runs)
    return group_runs(runs, columns), columns, histories


def test_plots_fit_their_labels_without_warnings(capfd: pytest.CaptureFixture) -> None:
    groups, columns, histories = _many_groups()
    gc.collect()  # an earlier test's garbage (say, a pooled database connection) warns when collected
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        figs = [accuracy_vs_sparsity_figure(groups), accuracy_vs_cost_figure(groups, columns),
                parallel_coordinates_figure(groups, columns), learning_curves_figure(groups, columns, histories)]
        for fig in figs:
            fig.canvas.draw()  # layout happens here
            box = fig.bbox
            texts = [t for lg in fig.legends for t in lg.get_texts()] + [a.title for a in fig.axes]
            for t in texts:  # every legend entry and title inside the figure, not cut off at its edge
                e = t.get_window_extent()
                assert box.x0 - 1 <= e.x0 and e.x1 <= box.x1 + 1 and box.y0 - 1 <= e.y0 and e.y1 <= box.y1 + 1, \
                    (t.get_text(), e, box)
            for ax in fig.axes[:1]:  # the legend (below) does not overlap the plotting area
                for lg in fig.legends:
                    assert lg.get_window_extent().y1 <= ax.get_window_extent().y0 + 1
    assert [str(w.message) for w in caught if "matplotlib" in w.filename or "zosam" in w.filename
            or "layout" in str(w.message).lower()] == []
    assert capfd.readouterr().err == ""
    labels = [t.get_text() for t in figs[3].legends[0].get_texts()]
    assert labels[-1] == "stopped early (x: last epoch)" and len(labels) == 21  # 20 groups + the key
    assert all(len(line) <= 46 for label in labels for line in label.splitlines())
    assert "update_interval_with_a_long_name=" in labels[0].replace("\n", "")
