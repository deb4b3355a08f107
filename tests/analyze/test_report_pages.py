"""The report page's contents and footer, and where a partial report goes: built from hand-made ``Report`` objects
and report folders (no model), so each case is exact and fast."""

from __future__ import annotations

import json
import re
from pathlib import Path

from toylens.report.build import report_folder
from toylens.report.config import AnalyzeConfig
from toylens.report.folder import REPORT_MARKER
from toylens.report.html import render
from toylens.report.page import Report, Section, Table


def _report(*ids: str, ablation=None) -> Report:
    sections = [Section(i, f"Title of {i}", "intro", [Table(["a"], [[1.0]])]) for i in ids]
    return Report(title="t", run_name="r", data={"highlights": {"rows": [["x", 1]]}}, sections=sections,
                  ablation=ablation)


def test_contents_numbers_agree_with_the_section_headings():
    page = render(_report("model", "training", "attention"))
    toc = re.search(r'<nav class="toc">.*?</nav>', page, re.S).group(0)
    assert '<li class="glance"><a href="#glance">At a glance</a></li>' in toc  # no number of its own
    numbered = re.findall(r'<li value="(\d+)"><a href="#([\w-]+)">', toc)
    headed = re.findall(r'<section id="([\w-]+)"><h2>(\d+)\. ', page)
    assert [(sid, n) for n, sid in numbered] == headed == [("model", "1"), ("training", "2"), ("attention", "3")]
    assert "nav.toc li.glance { list-style:none; }" in page


def test_the_footer_names_ablation_csv_only_when_it_is_written():
    assert "ablation.csv" not in render(_report("model", "attention")).split("<footer>")[1]
    page = render(_report("model", "ablation", ablation=object()))
    assert "ablation.csv the full ablation table" in page.split("<footer>")[1]


def _toylens_report(folder: Path, *ids: str) -> None:
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps({"sections": [{"id": i, "title": i} for i in ids]}))
    (folder / REPORT_MARKER).write_text("written by toylens\n")


def test_a_partial_report_never_replaces_another_partial_report(tmp_path):
    run = tmp_path / "run"
    _toylens_report(run / "report", "model", "training", "attention", "circuits", "dla", "ablation")
    first = AnalyzeConfig(analyses=["attention", "patching", "tracing", "discovery"])
    out1, why = report_folder(run, first, _report("model", "training", "attention", "patching"))
    assert re.fullmatch(r"report-attention\+3-more-[0-9a-f]{6}", out1.name) and f"written to {out1} instead" in why
    _toylens_report(out1, "model", "training", "attention", "patching")
    second = AnalyzeConfig(analyses=["attention", "neurons", "fold", "dla"])  # also 4 names, led by attention
    out2, _ = report_folder(run, second, _report("model", "training", "fold", "attention"))
    assert out2 != out1 and out2.name.startswith("report-fold+3-more-")
    again, _ = report_folder(run, first, _report("model", "training", "attention", "patching"))
    assert again == out1  # the same analyses replace their own side report
    # a side folder holding sections this report lacks is kept too: the next free name
    fewer, why = report_folder(run, first, _report("model", "training", "attention"))
    assert fewer == out1.with_name(out1.name + "-2") and f"written to {fewer} instead" in why
    short, _ = report_folder(run, AnalyzeConfig(analyses=["dla"]), _report("model", "training", "dla"))
    assert short.name == "report-dla"
