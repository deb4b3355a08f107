"""The user's own analysis as a report section, through the one registry every built-in section is in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from toylens.report.registry import ANALYSES, BUILTINS, BY_NAME, resolve, resolve_all

PROBE = textwrap.dedent('''
    import plotly.graph_objects as go
    import torch
    import torch.nn.functional as F

    from toylens.report.registry import AnalysisOutput


    def probe(model, run, batch):
        """Loss and embedding norm, measured my way"""
        logits = model(batch.tokens)
        loss = F.cross_entropy(logits[batch.loss_mask], batch.targets[batch.loss_mask])
        return AnalysisOutput({"loss": float(loss), "norms": {"W_E": float(model.W_E.norm())}, "task": run.task.name,
                               "rows": len(batch)},
                              figures={"norms": go.Figure(go.Bar(x=["W_E"], y=[float(model.W_E.norm())]))},
                              text="A probe of my own.")


    def broken(model, run, batch):
        raise RuntimeError("my probe is broken")


    def picky(model, run, batch):
        return {"x": 1.0}


    picky.applies = lambda run: "needs a parity run"


    def not_json(model, run, batch):
        return {"x": object()}


    def lists(model, run, batch):
        return {"hist": [1, 2.5, float("nan")], "long": list(range(30)), "by": {"layer": [0.25, 0.5]}, "tag": ["a"]}
''')


def test_every_section_is_an_entry_of_the_one_registry():
    names = [s.name for s in BUILTINS]
    assert names[:2] == ["overview", "training"] and names[-1] == "dynamics"
    assert list(ANALYSES) == [s.name for s in BUILTINS if s.listed]
    from toylens.report.config import AnalyzeConfig

    assert AnalyzeConfig().analyses == list(ANALYSES)  # toylens-analyze's default: every listed entry, page order
    assert [s.name for s in resolve_all(["discovery", "attention", "fold"])] == ["fold", "attention", "discovery"]
    for s in BUILTINS:
        assert s.title and callable(s.build) and callable(s.applies) and s.origin is None
        assert s.build.__qualname__.startswith("toylens.report.")  # module:function of its builder
    assert BY_NAME["overview"].section_id == "model"
    from omegaconf import OmegaConf

    from toylens._paths import config_dir

    assert OmegaConf.load(config_dir() / "analyze.yaml").analyses == list(ANALYSES)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_run):
    root = tmp_path_factory.mktemp("custom")
    run = tiny_run(root / "run")
    (root / "mine").mkdir()
    (root / "mine" / "probe.py").write_text(PROBE)
    return run, root / "mine" / "probe.py"


def _report(run, analyses, **kw):
    from toylens.report.build import build_report
    from toylens.report.config import AnalyzeConfig, BatchConfig
    from toylens.runs.run import load_run

    cfg = AnalyzeConfig(run=str(run), analyses=analyses, batch=BatchConfig(size=48), progress=False, device="cpu",
                        **kw)
    return build_report(load_run(run), cfg), cfg


def test_a_file_analysis_equals_a_direct_computation(trained):
    import torch.nn.functional as F

    from toylens.runs.run import load_run

    run, probe = trained
    report, cfg = _report(run, ["attention", f"{probe}:probe"])
    r = load_run(run)
    model = r.model()
    batch = r.batch(48, cfg.batch.seed)
    with torch.no_grad():
        logits = model(batch.tokens)
        loss = F.cross_entropy(logits[batch.loss_mask], batch.targets[batch.loss_mask])
    got = report.data["probe"]
    assert got["loss"] == pytest.approx(float(loss), abs=1e-6) and got["rows"] == 48 and got["task"] == "prev_token"
    assert got["norms"]["W_E"] == pytest.approx(float(model.W_E.detach().norm()), rel=1e-6)
    origin = report.data["origins"]["probe"]
    assert origin["path"] == str(probe) and len(origin["sha256"]) == 64
    section = next(s for s in report.sections if s.id == "probe")
    assert section.title == "Loss and embedding norm, measured my way"
    kinds = [type(b).__name__ for b in section.blocks]
    assert kinds == ["Note", "Table", "Figure"]
    table = section.blocks[1]
    assert dict(map(tuple, table.rows)) == {"loss": got["loss"], "norms/W_E": got["norms"]["W_E"], "rows": 48.0}
    assert report.data["timings_s"]["probe"] >= 0
    assert [s.id for s in report.sections][-2:] == ["attention", "probe"]


def test_a_failing_or_not_applicable_analysis_is_its_sections_error_or_reason(trained):
    run, probe = trained
    report, _ = _report(run, [f"{probe}:broken", f"{probe}:picky", f"{probe}:not_json", "dla"])
    errors = {e["analysis"]: e["error"] for e in report.data["errors"]}
    assert errors["broken"] == "RuntimeError: my probe is broken"
    assert errors["not_json"].startswith("TypeError: analysis not_json's results are not JSON-able")
    assert report.data["broken"] == {"error": "RuntimeError: my probe is broken"}
    assert {"analysis": "picky", "reason": "needs a parity run"} in report.data["left_out"]
    ids = [s.id for s in report.sections]
    assert "broken" in ids and "picky" not in ids and "dla" in ids  # the others still run


def test_unknown_names_and_bad_references_are_one_line(trained, tmp_path):
    from toylens.runs.config import ConfigError

    run, probe = trained
    with pytest.raises(ConfigError, match=r"'atention' is not an analysis; did you mean attention\?"):
        resolve("atention")
    with pytest.raises(ConfigError, match=r"has no 'probee'"):
        resolve(f"{probe}:probee")
    with pytest.raises(ConfigError, match="no such file"):
        resolve(f"{tmp_path / 'nope.py'}:probe")
    (tmp_path / "attention.py").write_text("def attention(model, run, batch):\n    return {}\n")
    with pytest.raises(ConfigError, match="a built-in section's"):
        resolve(f"{tmp_path / 'attention.py'}:attention")


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", HYDRA_FULL_ERROR="0", **extra)
    env.pop("WANDB_API_KEY", None)
    return env


def test_the_cli_with_a_file_and_an_entry_point_analysis_strict_and_bad_input(trained, tmp_path):
    run, probe = trained
    site = tmp_path / "site"
    (site / "mypkg").mkdir(parents=True)
    (site / "mypkg" / "__init__.py").write_text(PROBE)
    (site / "mypkg-0.1.dist-info").mkdir()
    (site / "mypkg-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: mypkg\nVersion: 0.1\n")
    (site / "mypkg-0.1.dist-info" / "entry_points.txt").write_text("[toylens.analyses]\nmy_probe = mypkg:probe\n"
                                                                   "my_broken = mypkg:broken\n")
    cli = [sys.executable, "-m", "toylens.report.cli", f"run={run}", "batch.size=32", "progress=false", "device=cpu"]
    p = subprocess.run([*cli, "analyses=[my_probe,my_broken]", "strict=true"], cwd=tmp_path,
                       env=_env(PYTHONPATH=str(site)), capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "my_broken" in p.stderr and "my probe is broken" in p.stderr, p.stderr
    data = json.loads((run / "report-my_probe+my_broken" / "report.json").read_text()) if \
        (run / "report-my_probe+my_broken").exists() else json.loads((run / "report" / "report.json").read_text())
    assert data["my_probe"]["rows"] == 32 and data["origins"]["my_probe"]["dist"] == "mypkg==0.1"
    before = sorted(p.name for p in run.iterdir())
    p = subprocess.run([*cli, "analyses=[my_probe]"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=300)  # the package is not installed here
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "'my_probe' is not an analysis" in lines[0], p.stderr
    p = subprocess.run([*cli, "analyses=[attention,nope.py:probe]"], cwd=tmp_path, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2 and "no such file" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written


def test_over_checkpoints_a_user_analysis_is_computed_on_each_checkpoint(trained):
    import torch.nn.functional as F

    from toylens.runs.run import load_run

    run, probe = trained
    report, cfg = _report(run, [], over="checkpoints")
    assert "probe" not in report.data["dynamics"]
    cfg.dynamics.analyses = [f"{probe}:probe", f"{probe}:broken"]
    from toylens.report.build import build_report

    r = load_run(run)
    report = build_report(r, cfg)
    series = report.data["dynamics"]["probe"]
    assert series["steps"] == r.steps == [10, 20]
    batch = r.batch(48, cfg.batch.seed)
    for i, step in enumerate(r.steps):
        model = r.model(step)
        with torch.no_grad():
            logits = model(batch.tokens)
        want = F.cross_entropy(logits[batch.loss_mask], batch.targets[batch.loss_mask])
        assert series["loss"][i] == pytest.approx(float(want), abs=1e-6)
        assert series["norms/W_E"][i] == pytest.approx(float(model.W_E.detach().norm()), rel=1e-6)
    assert series["loss"][0] != series["loss"][1]
    assert report.data["dynamics"]["broken"] == {"steps": [10, 20]}
    assert [e["step"] for e in report.data["errors"] if e["analysis"] == "dynamics/broken"] == [10, 20]
    names = [b.name for s in report.sections if s.id == "dynamics" for b in s.blocks if hasattr(b, "fig")]
    assert "dynamics/probe" in names


def test_a_user_analysis_runs_without_gradients():
    from toylens.report.registry import SectionSpec, call_user

    seen = []
    spec = SectionSpec("g", "g", lambda ctx: None, fn=lambda m, r, b: seen.append(torch.is_grad_enabled()))
    call_user(spec, None, None, None)
    assert seen == [False]


def test_lists_of_numbers_are_rows_of_the_sections_table(trained):
    from toylens.report.html import render

    run, probe = trained
    report, _ = _report(run, [f"{probe}:lists"])
    assert report.data["lists"]["hist"] == [1, 2.5, None] and report.data["lists"]["long"] == list(range(30))
    table = next(s for s in report.sections if s.id == "lists").blocks[0]
    assert table.rows == [["hist", [1, 2.5, None]], ["long", "(list of 30, in report.json)"], ["by/layer", [0.25, 0.5]]]
    page = render(report)
    assert "[1, 2.5, —]" in page and "(list of 30, in report.json)" in page


def test_analyze_help_lists_installed_analysis_plugins(tmp_path, monkeypatch):
    from toylens.report import cli

    site = tmp_path / "site"
    (site / "mypkg").mkdir(parents=True)
    (site / "mypkg" / "__init__.py").write_text(PROBE)
    (site / "mypkg-0.1.dist-info").mkdir()
    (site / "mypkg-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: mypkg\nVersion: 0.1\n")
    (site / "mypkg-0.1.dist-info" / "entry_points.txt").write_text("[toylens.analyses]\nconfidence = mypkg:probe\n")
    assert "installed plugins" not in cli.help_text()
    monkeypatch.syspath_prepend(str(site))
    text = cli.help_text()
    assert "  installed plugins:  confidence\n" in text and "built-in:           fold, induction" in text
