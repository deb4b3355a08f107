"""The pretrained report's CircuitsVis views in a real browser: headless Chromium opens the page from disk
with networking off, every view draws into its own container and nothing reaches the console. The
browser helpers are test_report_browser.py's (loaded by path: tests are not a package)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from toylens.report.config import AnalyzeConfig
from toylens.report.pretrained import make_pretrained_report

_spec = importlib.util.spec_from_file_location("_report_browser", Path(__file__).parents[1] / "test_report_browser.py")
browser = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(browser)
pytestmark = browser.pytestmark

CLEAN = ["When Mary and John went to store John gave", "When John and Mary went to store Mary gave"]
CORRUPTED = ["When Mary and John went to store Mary gave", "When John and Mary went to store John gave"]


def test_pretrained_views_render_offline(tiny_gpt2, tiny_gpt2_dir, tmp_path):
    hf_model, model = tiny_gpt2
    cfg = AnalyzeConfig(device="cpu", progress=False, out=str(tmp_path / "report"), analyses=["attention"])
    cfg.model.source, cfg.model.name, cfg.model.path = "pretrained", "gpt2", str(tiny_gpt2_dir)
    cfg.pairs.clean, cfg.pairs.corrupted = list(CLEAN), list(CORRUPTED)
    cfg.pairs.answers, cfg.pairs.wrong_answers = [" Mary", " John"], [" John", " Mary"]
    index = make_pretrained_report(cfg, model=model, hf_model=hf_model)
    data = json.loads((index.parent / "report.json").read_text())
    assert [v["component"] for v in data["views"]] == ["AttentionHeads"] * 2 + ["AttentionPatterns"] + \
        ["ColoredTokens"] * 3
    dom, console = browser.chromium(index, tmp_path / "profile")
    assert console == [], "\n".join(console)
    parser = browser._Plots()
    parser.feed(dom)
    assert parser.body.get("data-all-rendered") == "1"
    browser.check_views(parser, data["views"], browser.view_props(index.read_text()))
    assert len(parser.views) == 6
