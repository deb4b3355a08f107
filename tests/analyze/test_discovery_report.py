"""The report's discovery section: report.json holds every edge and the faithfulness curve, equal to
``discover`` on the same pairs; bad discovery settings are one-line config errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from toylens.analyze.discovery import discover
from toylens.analyze.prompts import pairs_from_task
from toylens.report.build import make_report
from toylens.report.config import AnalyzeConfig, validate
from toylens.runs.config import ConfigError
from toylens.runs.run import load_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_run) -> Path:
    return tiny_run(tmp_path_factory.mktemp("runs") / "tiny", **{"model.n_heads": 2})


def test_discovery_section_matches_discover(trained):
    run = load_run(trained)
    cfg = AnalyzeConfig(run=str(trained), device="cpu", progress=False, analyses=["discovery"])
    cfg.discovery.top_n = 6
    index = make_report(run, cfg)
    data = json.loads((index.parent / "report.json").read_text())
    d = data["discovery"]
    pairs = pairs_from_task(run.task, cfg.pairs.n, cfg.pairs.seed)
    want = discover(run.model(), pairs, method="eap", top_n=6)
    assert [(e["src"], e["dst"]) for e in d["edges"]] == [(e["src"], e["dst"]) for e in want.edges]
    assert [e["score"] for e in d["edges"]] == pytest.approx([e["score"] for e in want.edges], abs=1e-9)
    assert sum(e["in_circuit"] for e in d["edges"]) == 6
    assert d["faithfulness"]["recovered"][0] == pytest.approx(0.0, abs=1e-5)
    assert d["faithfulness"]["recovered"][-1] == pytest.approx(1.0, abs=1e-5)
    page = index.read_text()
    assert 'id="discovery"' in page and "Circuit (eap, 6 edges" in page


@pytest.mark.parametrize("key,value,match", [
    ("method", "magic", "discovery.method"),
    ("metric", "nope", "discovery.metric"),
    ("target", 1.5, "discovery.target"),
])
def test_bad_discovery_settings_are_one_line_errors(key, value, match):
    cfg = AnalyzeConfig(run="x")
    setattr(cfg.discovery, key, value)
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


def test_acdc_without_threshold_exits_2_on_the_command_line(trained):
    proc = subprocess.run([sys.executable, "-m", "toylens.report.cli", f"run={trained}", "analyses=[discovery]",
                           "discovery.method=acdc"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "discovery.threshold" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2


def test_circuit_formation_over_checkpoints(trained):
    run = load_run(trained)
    cfg = AnalyzeConfig(run=str(trained), device="cpu", progress=False, analyses=["discovery"], over="checkpoints")
    cfg.dynamics.analyses = ["discovery"]
    cfg.discovery.top_n = 4
    index = make_report(run, cfg)
    data = json.loads((index.parent / "report.json").read_text())
    final, dyn = data["discovery"], data["dynamics"]["discovery"]
    assert dyn["steps"] == run.steps
    circuit = [(e["src"], e["dst"]) for e in final["edges"] if e["in_circuit"]]
    assert [tuple(e) for e in dyn["edges"]] == circuit
    # the last checkpoint is the one the section analysed: the same scores and faithfulness
    last = {(e["src"], e["dst"]): e["score"] for e in final["edges"]}
    assert dyn["scores"][-1] == pytest.approx([last[e] for e in circuit], abs=1e-9)
    assert dyn["faithfulness"][-1] == pytest.approx(final["faithfulness"]["circuit_recovered"], abs=1e-9)
    assert set(dyn["formed_at"]) == {f"{s} -> {d}" for s, d in circuit}
    assert "dynamics/discovery_edges" in index.read_text()
