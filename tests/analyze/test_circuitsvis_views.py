"""CircuitsVis views in the run report: their props equal the model's own activations (run_with_cache),
each view has its own container, and the bundle is written once and referenced once. The browser
checks (every view draws offline) are in test_report_browser.py."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import circuitsvis.tokens
import pytest
import torch

from toylens.report import circuitsvis_views as cv
from toylens.report.build import build_report, index_figures
from toylens.report.config import AnalyzeConfig
from toylens.report.html import render, write_report
from toylens.report.page import Note, Report, Section, View
from toylens.report.sections import Context
from toylens.runs.run import load_run


def _config(run_dir: Path) -> AnalyzeConfig:
    cfg = AnalyzeConfig(run=str(run_dir), device="cpu", progress=False, analyses=["attention"], chunk_size=20)
    cfg.batch.size, cfg.reference.size = 24, 16
    return cfg


@pytest.fixture(scope="module")
def run_and_report(tmp_path_factory, tiny_run):
    run = load_run(tiny_run(tmp_path_factory.mktemp("runs") / "tiny"))
    return run, build_report(run, _config(run.path))


def _views(report) -> dict[str, View]:
    return {v.name: v for v in report.views()}


def test_props_equal_the_models_own_attention_loss_and_neurons(run_and_report):
    run, report = run_and_report
    model = run.model(device="cpu")
    batch = run.batch(24, _config(run.path).batch.seed)
    names = run.task.token_names
    views, rec = _views(report), report.data["attention"]["circuitsvis"]
    _, cache = model.run_with_cache(batch.tokens[: cv.N_EXAMPLES])
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    assert rec["rows"] == [0, 1, 2] and rec["tokens"] == batch.tokens[:3].tolist()
    assert rec["heads"] == [f"L{layer}H{h}" for layer in range(n_layers) for h in range(n_heads)]
    for i in range(3):
        v = views[f"circuitsvis/attention_heads/row{i}"]
        assert v.component == "AttentionHeads" and v.collapsed == (i > 0)
        labels = [" " + names[t] for t in batch.tokens[i].tolist()]
        assert v.props["tokens"] == labels == rec["labels"][i]
        assert v.props["attentionHeadNames"] == rec["heads"] and v.props["maskUpperTri"] is True
        got = torch.tensor(v.props["attention"], dtype=torch.float64)
        want = torch.cat([cache["pattern", layer][i] for layer in range(n_layers)]).double()
        assert got.shape == (n_layers * n_heads, batch.tokens.shape[1], batch.tokens.shape[1])
        assert (got - want).abs().max() < 1e-6
    pat = views["circuitsvis/attention_patterns/row0"]
    assert pat.component == "AttentionPatterns" and pat.props["tokens"] == rec["labels"][0]
    assert pat.props["attention"] == views["circuitsvis/attention_heads/row0"].props["attention"]
    # per-position loss: cross-entropy at the scored positions, 0 elsewhere
    loss = views["circuitsvis/loss/row0"]
    logp = model(batch.tokens[:1]).log_softmax(-1)[0].double()
    nll = -logp.gather(-1, batch.targets[0, :, None])[:, 0] * batch.loss_mask[0]
    assert loss.component == "ColoredTokens" and loss.props["tokens"] == rec["labels"][0]
    assert (torch.tensor(loss.props["values"]) - nll).abs().max() < 1e-6
    assert loss.props["minValue"] == 0.0 and loss.props["maxValue"] == pytest.approx(torch.log(torch.tensor(20.)))
    # neurons: the last MLP's top neurons by their largest activation after position 0, coloured by hook_post
    post = cache["post", n_layers - 1][0]
    top = post[1:].max(0).values.topk(cv.N_NEURONS).indices.tolist()
    assert rec["neurons"]["top"] == top and rec["neurons"]["hook"] == f"blocks.{n_layers - 1}.mlp.hook_post"
    for n in top:
        v = views[f"circuitsvis/neuron/blocks.{n_layers - 1}.mlp.hook_post/{n}"]
        assert (torch.tensor(v.props["values"]) - post[:, n]).abs().max() < 1e-6
    assert [v["name"] for v in rec["views"]] == list(views)
    assert [v["id"] for v in report.data["views"]] == [v.id for v in report.views()]
    json.dumps(report.data, allow_nan=False)  # report.json stays valid JSON


def test_view_props_are_circuitsvis_own(run_and_report):
    """The props read back from circuitsvis's rendered call equal what its local (inlined) variant passes."""
    component, props = cv.view_props(circuitsvis.tokens.colored_tokens, tokens=[" a", " b"], values=[0.5, -1.0])
    assert (component, props) == ("ColoredTokens", {"tokens": [" a", " b"], "values": [0.5, -1.0]})
    local = circuitsvis.tokens.colored_tokens(tokens=[" a", " b"], values=[0.5, -1.0]).local_src
    assert "CircuitsVis.ColoredTokens," in local and json.dumps(props) in local


class _Containers(HTMLParser):
    """Each ``div.tl-cvis``: its attributes, and every element opened while one is open (nesting)."""

    def __init__(self):
        super().__init__()
        self.views: list[dict] = []
        self.inside: list[str] = []  # tags opened inside an open view container
        self._open = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if self._open:
            self.inside.append(tag)
        if tag == "div" and "tl-cvis" in (a.get("class") or "").split():
            self.views.append(a)
            self._open += 1

    def handle_startendtag(self, tag, attrs):  # <div .../>: the pitfall of CircuitsVis's own HTML
        self.inside.append(f"{tag}/")

    def handle_endtag(self, tag):
        if tag == "div" and self._open:
            self._open -= 1


def test_page_has_one_bundle_and_a_container_per_view(run_and_report, tmp_path):
    _, report = run_and_report
    index = write_report(report, tmp_path / "report")
    page, folder = index.read_text(), index.parent
    assert (folder / cv.BUNDLE).read_bytes() == cv.bundle_path().read_bytes()
    assert re.findall(r"<script[^>]*\bsrc=\"([^\"]*)\"", page) == ["plotly.min.js", cv.BUNDLE]
    assert "var CircuitsVis" not in page and len(page) < len(cv.bundle_path().read_text()) / 4  # not inlined
    p = _Containers()
    p.feed(page)
    ids = [v["id"] for v in p.views]
    assert ids == [v.id for v in report.views()] and len(set(ids)) == len(ids) == 7
    assert p.inside == []  # empty, separate containers: nothing nests in a view before the page draws it
    for v in report.views():
        m = re.search(rf'<script type="application/json" id="data-{v.id}">(.*?)</script>', page, flags=re.S)
        assert json.loads(m.group(1)) == {"component": v.component, "props": v.props}
    # the self-contained copy (wandb's) inlines the bundle once instead of loading it
    inline = render(report, plotly_js="/*plotly*/")
    assert inline.count("var CircuitsVis=") == 1 and f'src="{cv.BUNDLE}"' not in inline


def test_no_views_no_bundle_and_attention_only_models_say_so(tmp_path, tiny_run):
    """A page without views neither writes nor loads the bundle; an attention-only run gets a Note, no neurons."""
    bare = Report("t", "r", {"toylens_report": 1}, [Section("s", "S", "x", [Note("hi")])])
    index_figures(bare)
    index = write_report(bare, tmp_path / "bare")
    assert not (index.parent / cv.BUNDLE).exists() and "circuitsvis" not in index.read_text().lower()
    run = load_run(tiny_run(tmp_path / "attn_only", **{"model.attn_only": True}))
    ctx = Context(run=run, cfg=_config(run.path), model=run.model(device="cpu"), step=run.last_step, device="cpu")
    blocks = cv.attention_views(ctx)
    assert [b.name for b in blocks if isinstance(b, View)][-1] == "circuitsvis/loss/row0"
    assert any(isinstance(b, Note) and "no MLP neurons" in b.text for b in blocks)
    assert "neurons" not in ctx.data["attention"]["circuitsvis"]


def test_long_sequences_show_their_first_positions(run_and_report, monkeypatch):
    """Above MAX_VALUES attention weights per view, the attention views keep the first k positions (and say so)."""
    run, _ = run_and_report
    ctx = Context(run=run, cfg=_config(run.path), model=run.model(device="cpu"), step=run.last_step, device="cpu")
    monkeypatch.setattr(cv, "MAX_VALUES", 4 * 6 * 6 + 5)  # 4 heads: room for 6 x 6 positions, not 7 x 7
    views = {b.name: b for b in cv.attention_views(ctx) if isinstance(b, View)}
    full = ctx.batch.tokens.shape[1]
    assert ctx.data["attention"]["circuitsvis"]["attention_positions_shown"] == 6 < full
    for name in ("circuitsvis/attention_heads/row1", "circuitsvis/attention_patterns/row0"):
        assert torch.tensor(views[name].props["attention"]).shape == (4, 6, 6) and len(views[name].props["tokens"]) == 6
        assert f"first 6 of {full} positions" in views[name].caption
    assert len(views["circuitsvis/loss/row0"].props["tokens"]) == full  # coloured tokens are cheap: all positions


def test_a_failing_view_keeps_the_section_and_is_recorded(run_and_report, monkeypatch):
    run, _ = run_and_report
    ctx = Context(run=run, cfg=_config(run.path), model=run.model(device="cpu"), step=run.last_step, device="cpu")
    monkeypatch.setattr(cv, "_RENDER_CALL", re.compile("never matches"))  # as if circuitsvis changed its HTML
    blocks = cv.attention_views(ctx)
    assert len(blocks) == 1 and blocks[0].kind == "fail" and "circuitsvis changed?" in blocks[0].text
    assert ctx.data["errors"][-1]["analysis"] == "attention (CircuitsVis views)"
    assert "circuitsvis changed?" in ctx.data["attention"]["circuitsvis"]["error"]
