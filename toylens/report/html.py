"""Render a ``Report`` as one offline HTML page and write the report folder atomically.

The folder holds ``index.html``, ``report.json`` (every number on the page), ``ablation.csv`` and
``plotly.min.js`` (copied once from the installed plotly package and loaded with a relative
``<script src>``: the page needs no network), and ``circuitsvis.js`` when the page has CircuitsVis views
(``View``: the bundle once, each view's props as JSON in its own ``div.tl-cvis``). Figures are
embedded as JSON and drawn by ``Plotly.newPlot``; each figure's div gets ``data-rendered="1"`` once
drawn (``"error"`` if not) and ``<body>`` gets ``data-all-rendered="1"`` when every figure is done,
which the browser test reads.

Everything is written into a temporary sibling folder first and then moved into place, so a
failure leaves the previous report untouched and never a half-written one. A report folder holds a
marker file (``.toylens-report``); only a folder with that marker is ever replaced, one writer at a time.
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from toylens.report.folder import PLOTLY_JS, check_report_dir, swap_in
from toylens.report.page import Figure, Note, Report, Table, View

_CSS = """
:root { --fg:#1d2430; --muted:#5b6575; --line:#dde2ea; --bg:#f6f7f9; --accent:#2f5fb3; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif; color:var(--fg);
       background:var(--bg); }
header { background:#1f2f4d; color:#fff; padding:18px 32px; }
header h1 { margin:0; font-size:22px; font-weight:600; }
header .sub { color:#c7d2e6; font-size:13px; margin-top:4px; word-break:break-all; }
.layout { display:flex; align-items:flex-start; }
nav.toc { position:sticky; top:0; width:220px; flex:none; padding:20px 16px; font-size:14px;
          max-height:100vh; overflow:auto; }
nav.toc h2 { font-size:13px; text-transform:uppercase; letter-spacing:.05em; color:var(--muted); margin:0 0 8px; }
nav.toc ol { margin:0; padding-left:20px; } nav.toc a { color:var(--accent); text-decoration:none; }
nav.toc li.left-out { color:var(--muted); list-style-type:circle; font-size:12px; }
nav.toc li.glance { list-style:none; }
nav.toc li.left-out span { display:block; }
figure.tl-fig figcaption { font-size:14px; font-weight:600; padding:4px 8px 0; min-height:22px; }
main { flex:1; min-width:0; padding:12px 32px 40px 8px; }
section { background:#fff; border:1px solid var(--line); border-radius:8px; padding:16px 20px; margin:16px 0; }
section h2 { margin:0 0 6px; font-size:19px; }
p.intro { color:var(--muted); margin:0 0 12px; max-width:900px; }
.grid { display:grid; grid-template-columns:repeat(auto-fill,minmax(460px,1fr)); gap:12px; }
figure.tl-fig { margin:0; border:1px solid var(--line); border-radius:6px; padding:4px; min-width:0; }
figure.tl-fig.wide { grid-column:1/-1; }
.note { border-left:4px solid var(--accent); background:#eef3fb; padding:8px 12px; margin:8px 0; border-radius:4px; }
.note.pass { border-color:#2e8540; background:#e9f5ec; } .note.fail { border-color:#c0392b; background:#fbeceb; }
.note.warn { border-color:#c98a00; background:#fdf6e3; }
.tablewrap { display:inline-block; vertical-align:top; max-width:100%; max-height:420px; overflow:auto;
             margin:8px 12px 12px 0; border:1px solid var(--line); border-radius:6px; }
table { border-collapse:collapse; font-size:13px; min-width:320px; }
caption { text-align:left; color:var(--muted); padding:6px 8px; caption-side:top; }
th, td { padding:4px 10px; border-bottom:1px solid var(--line); text-align:left; vertical-align:top; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; }
thead th { position:sticky; top:0; background:#f0f3f8; }
table.sortable th { cursor:pointer; user-select:none; }
table.sortable th[aria-sort=ascending]::after { content:" ▲"; }
table.sortable th[aria-sort=descending]::after { content:" ▼"; }
tr.hl td { font-weight:600; background:#fff8e1; }
footer { color:var(--muted); font-size:12px; padding:0 32px 24px 252px; }
@media (max-width: 900px) { nav.toc { display:none; } main { padding:8px; } footer { padding:0 8px 24px; } }
"""

_JS = r"""
(function () {
  "use strict";
  var template = JSON.parse(document.getElementById("tl-template").textContent);
  var divs = document.querySelectorAll("div.tl-plot");
  var left = divs.length;
  function done() { left -= 1; if (left === 0) { document.body.setAttribute("data-all-rendered", "1"); } }
  if (left === 0) { document.body.setAttribute("data-all-rendered", "1"); }
  Array.prototype.forEach.call(divs, function (div) {
    var spec = JSON.parse(document.getElementById("data-" + div.id).textContent);
    spec.layout.template = template;
    Plotly.newPlot(div, spec.data, spec.layout, {responsive: true, displaylogo: false}).then(
      function () { div.setAttribute("data-rendered", "1"); done(); },
      function (err) {
        div.setAttribute("data-rendered", "error");
        console.error("toylens: figure " + div.id + " failed to render: " + err);
        done();
      });
  });

  // Sortable tables: click a header to sort by that column, click again to reverse.
  function key(cell) {
    var v = cell.getAttribute("data-value");
    if (v === null) { return cell.textContent; }
    return v === "" ? null : parseFloat(v);
  }
  function sortBy(table, col, th) {
    var asc = th.getAttribute("aria-sort") !== "ascending";
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (c) { c.removeAttribute("aria-sort"); });
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a.cells[col]), y = key(b.cells[col]);
      var xm = x === null || (typeof x === "number" && isNaN(x));
      var ym = y === null || (typeof y === "number" && isNaN(y));
      if (xm || ym) { return xm === ym ? 0 : (xm ? 1 : -1); }  // missing values last, either way
      var c = (typeof x === "number" && typeof y === "number") ? x - y
        : String(x).localeCompare(String(y), undefined, {numeric: true});
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.title = "click to sort";
      th.addEventListener("click", function () { sortBy(table, col, th); });
    });
  });
})();
"""


def fmt(v: Any) -> str:
    """A value as the page shows it: floats to 4 significant digits, None as an em dash."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "NaN" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    return str(v)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _cell(v: Any, numeric_column: bool = True) -> str:
    cls = ' class="num"' if numeric_column else ""  # right-aligned only in all-number columns
    if _is_number(v):
        raw = "" if isinstance(v, float) and not math.isfinite(v) else repr(v)
        return f'<td{cls} data-value="{raw}">{html.escape(fmt(v))}</td>'
    if v is None:
        return f'<td{cls} data-value="">—</td>'
    return f"<td>{html.escape(fmt(v))}</td>"


def _table(t: Table) -> str:
    cls = ' class="sortable"' if t.sortable else ""
    numeric = [all(_is_number(r[i]) or r[i] is None for r in t.rows) and any(_is_number(r[i]) for r in t.rows)
               for i in range(len(t.columns))]
    head = "".join(('<th class="num">' if numeric[i] else "<th>") + html.escape(c) + "</th>"
                   for i, c in enumerate(t.columns))
    body = "".join(
        ('<tr class="hl">' if i in t.highlight else "<tr>") + "".join(_cell(v, numeric[j]) for j, v in enumerate(row))
        + "</tr>"
        for i, row in enumerate(t.rows))
    caption = f"<caption>{html.escape(t.caption)}</caption>" if t.caption else ""
    return (f'<div class="tablewrap"><table{cls}>{caption}<thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _script_json(obj: Any) -> str:
    # Inside <script>, "</" would end the element early.
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")


MODEBAR_PX = 34  # plotly's toolbar sits in the top right corner of the figure: keep plots below it


def _figure_json(fig) -> tuple[dict, str]:
    """(the figure's data and layout, its title). The title is taken out of the figure and shown as
    the figure's caption above it, so plotly's toolbar never covers it; the top margin leaves room
    for the toolbar (more when subplot titles sit above the plots)."""
    spec = json.loads(fig.to_json())
    layout = spec.get("layout", {})
    layout.pop("template", None)  # one shared template for the page instead
    title = layout.pop("title", {}) or {}
    text = title.get("text", "") if isinstance(title, dict) else str(title)
    above = [a for a in layout.get("annotations", []) if a.get("yref") == "paper" and a.get("y", 0) >= 1]
    margin = layout.setdefault("margin", {})
    margin["t"] = MODEBAR_PX + (24 if above else 0)
    if "height" in layout:  # the caption now holds the title: keep the plot area as it was
        layout["height"] = max(200, layout["height"] - 20)
    return {"data": spec.get("data", []), "layout": layout}, text


def _plain(title: str) -> str:
    """A plotly title as text: its <br> as a space, other tags dropped."""
    import re

    return re.sub(r"<[^>]+>", "", re.sub(r"<br\s*/?>", " ", title or ""))


def _blocks(blocks: list, data_scripts: list[str]) -> str:
    out, grid = [], []

    def flush():
        if grid:
            out.append(f'<div class="grid">{"".join(grid)}</div>')
            grid.clear()

    for b in blocks:
        if isinstance(b, Figure):
            spec, title = _figure_json(b.fig)
            data_scripts.append(f'<script type="application/json" id="data-{b.id}">{_script_json(spec)}</script>')
            wide = " wide" if b.wide else ""
            grid.append(f'<figure class="tl-fig{wide}"><figcaption>{html.escape(_plain(title))}</figcaption>'
                        f'<div class="tl-plot" id="{b.id}" data-name="{html.escape(b.name)}"></div></figure>')
            continue
        flush()
        if isinstance(b, View):
            from toylens.report.circuitsvis_views import view_html

            out.append(view_html(b, data_scripts))
        elif isinstance(b, Table):
            out.append(_table(b))
        elif isinstance(b, Note):
            out.append(f'<div class="note {b.kind}">{html.escape(b.text)}</div>')
        else:
            out.append(f"<p>{html.escape(str(b))}</p>")
    flush()
    return "".join(out)


def render(report: Report, plotly_js: str | None = None) -> str:
    """The page. ``plotly_js``: inline this plotly.js source instead of loading ``plotly.min.js``
    next to the page (for a single self-contained file, e.g. the copy logged to wandb)."""
    import plotly.io as pio

    data = report.data
    data_scripts: list[str] = []
    glance = data.get("highlights", {})
    if "rows" in glance:
        rows = glance["rows"]
    else:
        rows = [[k, v] for k, v in glance.items() if k not in ("top ablations", "previous_token_head")]
        for i, r in enumerate(glance.get("top ablations", []), 1):
            rows.append([f"ablation #{i}", f"{r['hook']} ({r['mode']}): loss {fmt(r['loss'])}, "
                                           f"Δ {fmt(r['delta_loss'])}"])
    parts = ['<section id="glance"><h2>At a glance</h2>', _table(Table(["", "value"], rows)), "</section>"]
    # "At a glance" carries no number, and each section's entry its heading's number (value=n): the browser's own
    # count would start at the glance entry and run one ahead of the headings
    toc = ['<li class="glance"><a href="#glance">At a glance</a></li>']
    for n, s in enumerate(report.sections, 1):
        toc.append(f'<li value="{n}"><a href="#{s.id}">{html.escape(s.title)}</a></li>')
        parts.append(f'<section id="{s.id}"><h2>{n}. {html.escape(s.title)}</h2>'
                     f'<p class="intro">{html.escape(s.intro)}</p>{_blocks(s.blocks, data_scripts)}</section>')
    for lo in data.get("left_out", []):  # analyses that do not apply to this model: named, with the reason
        toc.append(f'<li class="left-out" data-analysis="{html.escape(lo["analysis"])}">{html.escape(lo["analysis"])}'
                   f' <span>left out: {html.escape(lo["reason"])}</span></li>')
    run = data.get("run", {})
    template = pio.templates[pio.templates.default].to_plotly_json()
    if plotly_js is None:
        plotly_tag = f'<script src="{PLOTLY_JS}"></script>'
    else:
        plotly_tag = f"<script>{plotly_js}</script>"
    if report.views():  # the CircuitsVis bundle, once: beside the page, or inlined with plotly.js
        from toylens.report.circuitsvis_views import bundle_tags

        plotly_tag += bundle_tags(inline=plotly_js is not None)
    task = run.get("task", {}).get("name", "?")
    sub = data.get("header") or f"{run.get('path', '')} · checkpoint step {run.get('step', '?')} · task {task}"
    total = data.get("timings_s", {}).get("total")
    return "".join([
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(report.title)}</title><style>{_CSS}</style>{plotly_tag}</head><body>",
        f"<header><h1>{html.escape(report.title)}</h1><div class=\"sub\">{html.escape(sub)}</div></header>",
        f'<div class="layout"><nav class="toc"><h2>Contents</h2><ol>{"".join(toc)}</ol></nav>',
        f"<main>{''.join(parts)}</main></div>",
        f"<footer>Made by toylens-analyze{f' in {total:.1f} s' if total else ''}. report.json holds every "
        f"number on this page{'; ablation.csv the full ablation table' if report.ablation is not None else ''}."
        "</footer>",
        f'<script type="application/json" id="tl-template">{_script_json(template)}</script>',
        "".join(data_scripts), f"<script>{_JS}</script></body></html>",
    ])


def dumps(obj: Any, indent: int = 1) -> str:
    """JSON with nested objects indented and lists of numbers on one line (readable, not huge)."""

    def enc(v: Any, level: int) -> str:
        if isinstance(v, dict):
            if not v:
                return "{}"
            pad = " " * (indent * (level + 1))
            items = ",\n".join(f"{pad}{json.dumps(str(k))}: {enc(x, level + 1)}" for k, x in v.items())
            return "{\n" + items + "\n" + " " * (indent * level) + "}"
        if isinstance(v, list) and any(isinstance(x, dict) for x in v):
            pad = " " * (indent * (level + 1))
            return "[\n" + ",\n".join(pad + enc(x, level + 1) for x in v) + "\n" + " " * (indent * level) + "]"
        return json.dumps(v, separators=(",", ":"), allow_nan=False)

    return enc(obj, 0) + "\n"


def write_report(report: Report, out_dir: str | os.PathLike, field: str | None = None) -> Path:
    """Write ``out_dir/{index.html,report.json,ablation.csv,plotly.min.js}`` (and ``circuitsvis.js`` when the
    page has CircuitsVis views) atomically; returns index.html.
    ``field`` (e.g. ``"out"``) names the setting in the error when ``out_dir`` is not a toylens report."""
    from plotly.offline import get_plotlyjs

    out_dir = check_report_dir(out_dir, field)
    page = render(report)
    body = dumps(report.data)  # before anything is written: fails on a non-JSON value
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        os.chmod(tmp, 0o755)
        (tmp / PLOTLY_JS).write_text(get_plotlyjs(), encoding="utf-8")
        if report.views():
            from toylens.report.circuitsvis_views import BUNDLE, bundle_path

            shutil.copyfile(bundle_path(), tmp / BUNDLE)
        (tmp / "report.json").write_text(body, encoding="utf-8")
        if report.ablation is not None:
            report.ablation.to_csv(tmp / "ablation.csv")
        for rel, writer in report.files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            writer(tmp / rel)
        (tmp / "index.html").write_text(page, encoding="utf-8")
        for f in tmp.rglob("*"):
            os.chmod(f, 0o755 if f.is_dir() else 0o644)
        swap_in(tmp, out_dir, field)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / "index.html"
