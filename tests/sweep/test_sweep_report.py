"""``toylens-sweep-report``: the numbers against numpy and plain loops over the runs' own reports,
computing missing analyses once, the failed run's error line, the page in a real browser, the CLI."""

from __future__ import annotations

import csv
import importlib.util
import itertools
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from toylens.sweep import index as ix
from toylens.sweep.report import SweepReportConfig, make_sweep_report

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(batch_size=40, reference_size=24, chunk_size=20, device="cpu", progress=False, wandb=False, top_k=4)


@pytest.fixture(scope="module")
def report(fake_sweep):
    runs = [fake_sweep / str(n) for n in range(3)]
    assert not any((r / "report").exists() for r in runs)
    index = make_sweep_report(fake_sweep, SweepReportConfig(**SMALL))
    return index, json.loads((index.parent / "report.json").read_text())


def _run_reports(sweep: Path) -> list[dict]:
    return [json.loads((sweep / str(n) / "report" / "report.json").read_text()) for n in range(3)]


def _spearman_reference(a: list[float], b: list[float]) -> float:
    """Pearson correlation of the ranks; a tie shares the average of its ranks (a plain O(n^2) loop)."""
    def rank(x):
        return [sum(y < v for y in x) + (sum(y == v for y in x) + 1) / 2 for v in x]

    xa, xb = rank(a), rank(b)
    ma, mb = sum(xa) / len(xa), sum(xb) / len(xb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(xa, xb, strict=True))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in xa) * sum((y - mb) ** 2 for y in xb))


def test_missing_analyses_are_computed_into_each_run(report, fake_sweep):
    for data in _run_reports(fake_sweep):
        assert {"attention", "circuits", "ablation"} <= set(data)
        assert data["settings"]["batch"]["size"] == 40 and data["ablation"]["n_reference_rows"] == 24
    before = [(fake_sweep / str(n) / "report" / "report.json").stat().st_mtime_ns for n in range(3)]
    make_sweep_report(fake_sweep, SweepReportConfig(**SMALL))  # reuses them: nothing recomputed
    assert before == [(fake_sweep / str(n) / "report" / "report.json").stat().st_mtime_ns for n in range(3)]


def test_ablation_mean_std_and_consistency_equal_numpy_on_the_runs_tables(report, fake_sweep):
    _, data = report
    tables = [{r["hook"]: r["delta_loss"] for r in d["ablation"]["rows"] if r["mode"] == "mean"}
              for d in _run_reports(fake_sweep)]
    a = data["ablation"]
    hooks = a["hooks"]
    assert hooks == _run_reports(fake_sweep)[0]["ablation"]["hooks"] and len(hooks) > 10  # forward order, all
    d = np.array([[t[h] for h in hooks] for t in tables])
    np.testing.assert_allclose(a["mean"], d.mean(0), rtol=1e-12)
    np.testing.assert_allclose(a["std"], d.std(0, ddof=1), rtol=1e-12)
    np.testing.assert_allclose(a["delta_loss"], d, rtol=0)
    # top-k fraction: in how many runs is each hook among that run's 4 largest Δloss (ties: forward order)
    tops = [set(sorted(hooks, key=lambda h: -t[h])[:4]) for t in tables]
    assert a["top_k_fraction"] == [sum(h in top for top in tops) / 3 for h in hooks]
    assert a["top_k_in_every_run"] == [h for h in hooks if all(h in top for top in tops)]
    rhos = [_spearman_reference([t[h] for h in hooks], [u[h] for h in hooks])
            for t, u in itertools.combinations(tables, 2)]
    assert [p[2] for p in a["spearman_pairs"]] == pytest.approx(rhos, abs=1e-12)
    assert a["spearman_mean"] == pytest.approx(sum(rhos) / 3, abs=1e-12)
    assert -1 <= a["spearman_mean"] <= 1
    rows = list(csv.DictReader((fake_sweep / "sweep_report" / "ablation.csv").open()))
    assert [r["hook"] for r in rows] == hooks
    assert [float(r["run_1"]) for r in rows] == pytest.approx(d[1].tolist(), rel=1e-12)


def test_head_scores_final_metrics_failed_runs_and_the_index(report, fake_sweep):
    _, data = report
    runs = _run_reports(fake_sweep)
    prev = data["head_scores"]["previous_token"]
    for head, e in prev.items():
        want = [r["attention"]["scores_by_head"][head]["previous_token"] for r in runs]
        assert e["runs"] == [0, 1, 2] and e["values"] == pytest.approx(want)
        assert e["mean"] == pytest.approx(np.mean(want)) and e["std"] == pytest.approx(np.std(want, ddof=1))
    cop = data["head_scores"]["copying_score"]["L1H0"]["values"]
    assert cop == pytest.approx([r["circuits"]["scores_by_head"]["L1H0"]["copying_score"] for r in runs])
    assert data["sweep"]["varied"] == ["seed"] and data["sweep"]["counts"]["finished"] == 3
    for n in range(3):
        metrics = [json.loads(line) for line in (fake_sweep / str(n) / "metrics.jsonl").read_text().splitlines()]
        final = data["runs"][n]["final"]
        assert final["eval/loss"] == [m["eval/loss"] for m in metrics if "eval/loss" in m][-1]
        assert final["train/loss"] == metrics[-1]["train/loss"]
        assert final["clean_loss"] == runs[n]["ablation"]["clean_loss"]
        assert data["curves"][str(n)]["train/loss"]["step"] == [m["step"] for m in metrics if "train/loss" in m]
    assert [r["params"]["seed"] for r in data["runs"]] == ["0", "1", "2", "3"]
    assert data["failed"] == [{"num": 3, "label": "3: seed=3", "status": "failed",
                               "error": "train/loss became nan by step 5; lower optim.lr"}]
    index = json.loads((fake_sweep / "sweep.json").read_text())
    assert index["report"] == {"html": "sweep_report/index.html", "json": "sweep_report/report.json"}
    assert [r["status"] for r in index["runs"]] == ["finished"] * 3 + ["failed"]
    page = (fake_sweep / "sweep_report" / "index.html").read_text()
    assert "train/loss became nan by step 5; lower optim.lr" in page
    for section in ("overview", "curves", "metrics", "ablation", "heads", "failed"):
        assert f'<section id="{section}">' in page
    names = {f["name"] for f in data["figures"]}
    assert {"sweep/train_loss", "sweep/eval_loss", "sweep/ablation_mean", "sweep/ablation_runs",
            "sweep/head_scores/previous_token", "sweep/head_scores/copying_score"} <= names


def _browser():
    spec = importlib.util.spec_from_file_location("_tl_browser", REPO / "tests/analyze/test_report_browser.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_page_renders_in_chromium(report, tmp_path):
    b = _browser()
    if not b.CHROMIUM.exists() and not os.environ.get("CI"):  # under CI a missing browser fails
        pytest.skip(f"{b.CHROMIUM} is not installed (the Makefile/CI installs it)")
    index, data = report
    dom, console = b.chromium(index, tmp_path / "profile")
    assert console == [], "\n".join(console)
    parser = b._Plots()
    parser.feed(dom)
    assert parser.body.get("data-all-rendered") == "1"
    assert list(parser.plots) == [f["id"] for f in data["figures"]]
    assert all(v["rendered"] == "1" and v["main_svg"] >= 1 for v in parser.plots.values()), parser.plots


def test_cli(fake_sweep, tmp_path, capsys):
    from toylens.sweep import cli

    with pytest.raises(SystemExit) as e:
        cli.main([str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "not a sweep directory" in err[0]
    with pytest.raises(SystemExit) as e:
        cli.main([str(fake_sweep), "--analyses", "attention,ablaton", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "'ablaton' is not an analysis" in err[0]
    cli.main([str(fake_sweep), "--quiet", "--no-wandb", "--batch-size", "40", "--reference-size", "24",
              "--device", "cpu", "--top-k", "2"])
    out, err = capsys.readouterr()
    assert out.strip() == str(fake_sweep.resolve() / "sweep_report" / "index.html")
    assert "4 runs: 3 finished, 1 failed" in err
    assert json.loads((fake_sweep / "sweep_report" / "report.json").read_text())["ablation"]["top_k"] == 2
    assert ix.read_index(fake_sweep)["counts"]["failed"] == 1


def test_a_foreign_sweep_report_folder_is_refused_before_any_work(tmp_path):
    from toylens.runs.config import ConfigError

    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    (tmp_path / "sweep_report").mkdir()
    (tmp_path / "sweep_report" / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="toylens did not write"):
        make_sweep_report(tmp_path, SweepReportConfig(**SMALL))
    assert [p.name for p in (tmp_path / "sweep_report").iterdir()] == ["mine.txt"]
