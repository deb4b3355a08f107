"""The sweep report's page: sections of figures and tables, rendered with the run report's own
HTML pieces (``toylens.report.html``: styles, sortable tables, offline plotly.js and the
``data-rendered`` markers the browser test reads), written atomically, and logged to wandb."""

from __future__ import annotations

import csv
import html
import io
import math
import os
import shutil
import tempfile
from pathlib import Path

import plotly.graph_objects as go

from toylens.report import html as rh
from toylens.report.build import _title, _unique_id
from toylens.report.folder import swap_in
from toylens.report.page import Figure, Note, Section, Table

TITLE = "toylens sweep report"


def _style(fig: go.Figure, height: int = 420, bottom: int = 50) -> go.Figure:
    fig.update_layout(height=height, margin=dict(l=60, r=20, t=56, b=bottom), title_font_size=14, title_x=0.02)
    return fig


def _nan(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _label(data: dict, num) -> str:
    return next((r["label"] for r in data["runs"] if str(r["num"]) == str(num)), str(num))


# --- sections ------------------------------------------------------------------------------------
def overview(data: dict) -> Section:
    s, c = data["sweep"], data["sweep"]["counts"]
    rows = [["sweep directory", s["dir"]], ["launcher", s.get("launcher")], ["runs", s["n_runs"]]]
    rows += [[k, v] for k, v in c.items() if v]
    rows += [["swept", ", ".join(s["varied"]) or "—"], ["command overrides", " ".join(s.get("overrides") or [])]]
    a = data["ablation"]
    if a:
        rows += [["ablation consistency (mean pairwise Spearman)", a.get("spearman_mean")],
                 [f"hooks in the top {a['top_k']} of every run", ", ".join(a["top_k_in_every_run"]) or "none"]]
    return Section("overview", "Sweep", (
        "One row per fact about the sweep. Runs are independent: each has its own seed, run directory and "
        "checkpoints; sweep.json next to this folder indexes them."), [Table(["", "value"], rows)])


def curves(data: dict) -> Section:
    section = Section("curves", "Loss curves, every run", (
        "Training and held-out loss of every finished run against the step, overlaid (log scale). Runs "
        "that learn the same thing at the same pace lie on top of each other."))
    for key in ("train/loss", "eval/loss"):
        traces = [go.Scatter(x=c[key]["step"], y=c[key]["value"], mode="lines", name=_label(data, num))
                  for num, c in data["curves"].items() if c[key]["step"]]
        if traces:
            fig = go.Figure(traces)
            fig.update_layout(title=f"{key}, every run", xaxis_title="step", yaxis_title=key, legend_title="run")
            if all(v is not None and v > 0 for t in traces for v in t.y):
                fig.update_yaxes(type="log")
            section.blocks.append(Figure(f"sweep/{key.replace('/', '_')}", _style(fig)))
    if not section.blocks:
        section.blocks.append(Note("No finished run has loss rows in metrics.jsonl.", "warn"))
    return section


def metrics(data: dict) -> Section:
    varied = data["sweep"]["varied"]
    cols = ["run", "status", *varied, "step", "train/loss", "eval/loss", "eval/accuracy", "previous-token head",
            "previous_token score", "clean loss", "top ablation", "its Δ loss", "wall s"]
    rows = []
    for r in data["runs"]:
        f = r.get("final") or {}
        rows.append([r["num"], r["status"], *[r["params"].get(k) for k in varied], r.get("step"),
                     f.get("train/loss"), f.get("eval/loss"), f.get("eval/accuracy"), f.get("previous_token_head"),
                     f.get("previous_token_score"), f.get("clean_loss"), f.get("top_ablation"),
                     f.get("top_ablation_delta_loss"), r.get("wall_s")])
    return Section("metrics", "Final metrics", (
        "The last logged value of each metric per run, with the swept hyper-parameters as columns. Click a "
        "header to sort."), [Table(cols, rows, sortable=True, caption="Every run; click a column header to sort")])


def ablation(data: dict) -> Section:
    a = data["ablation"]
    section = Section("ablation", "Ablating every hook, across runs", (
        "Each run's mean-ablation Δloss per hook (from its own analysis report), summarised over runs: mean ± "
        "sample std. Consistency: the mean over pairs of runs of the Spearman rank correlation of their Δloss "
        "(1 = every run ranks the hooks the same), and per hook the fraction of runs in which it is among "
        "that run's top-k hooks (1 = it matters in every run)."))
    if not a:
        section.blocks.append(Note("No finished run has an ablation table.", "warn"))
        return section
    hooks, mean, std = a["hooks"], a["mean"], a["std"]
    rho = a.get("spearman_mean")
    section.blocks.append(Note(
        f"{len(a['runs'])} runs, {len(hooks)} hooks. Mean pairwise Spearman correlation: "
        f"{'—' if rho is None else f'{rho:.3f}'}. In the top {a['top_k']} of every run: "
        f"{', '.join(a['top_k_in_every_run']) or 'none'}.", "info"))
    order = sorted(range(len(hooks)), key=lambda i: -(mean[i] if mean[i] is not None else math.inf))
    shown = order[:40]
    bottom = 50 + int(5.2 * max((len(hooks[i]) for i in shown), default=10))
    fig = go.Figure(go.Bar(x=[hooks[i] for i in shown], y=[mean[i] for i in shown],
                           error_y=dict(type="data", array=[_nan(std[i]) or 0.0 for i in shown], visible=True)))
    fig.update_layout(title=f"Mean Δ loss ± std over {len(a['runs'])} runs (top {len(shown)} by mean)",
                      xaxis_title="hook", yaxis_title="Δ loss")
    fig.update_xaxes(type="category", tickangle=-45, automargin=False)
    section.blocks.append(Figure("sweep/ablation_mean", _style(fig, 500, bottom), wide=True))
    heat = go.Figure(go.Heatmap(z=a["delta_loss"], x=hooks, y=[_label(data, n) for n in a["runs"]],
                                colorscale="Viridis", colorbar_title="Δ loss"))
    heat.update_layout(title="Δ loss per run and hook", xaxis_title="hook", yaxis_title="run")
    heat.update_xaxes(type="category", tickangle=-45, automargin=False)
    heat.update_yaxes(type="category", autorange="reversed")
    section.blocks.append(Figure("sweep/ablation_runs", _style(heat, 140 + 28 * len(a["runs"]) + bottom, bottom),
                                 wide=True))
    section.blocks.append(Table(
        ["hook", "mean Δ loss", "std", "min", "max", f"top-{a['top_k']} fraction"],
        [[hooks[i], mean[i], std[i], a["min"][i], a["max"][i], a["top_k_fraction"][i]] for i in order],
        sortable=True, caption="Every hook ablated in every run (mean mode); click a header to sort"))
    if a["spearman_pairs"]:
        section.blocks.append(Table(["run", "run", "Spearman ρ"], a["spearman_pairs"],
                                    caption="Rank correlation of Δ loss over hooks, per pair of runs"))
    if a.get("dropped_hooks"):
        section.blocks.append(Note("Left out (not ablated in every run, e.g. other architectures): "
                                   + ", ".join(a["dropped_hooks"]), "warn"))
    return section


def heads(data: dict) -> Section:
    section = Section("heads", "Head scores across runs", (
        "The distribution over runs of each head's scores: attention head-type scores (previous_token, "
        "induction, ...: the attention they pay to the expected key) and the OV copying score. A head label "
        "names a position in the model, so the same circuit may sit in different heads in different runs."))
    hs = data["head_scores"]
    rows = []
    for name, per_head in hs.items():
        if not any(v is not None for e in per_head.values() for v in e["values"]):
            continue
        fig = go.Figure([go.Box(y=e["values"], name=head, boxpoints="all", jitter=0.3, pointpos=0,
                                text=[_label(data, n) for n in e["runs"]]) for head, e in per_head.items()])
        fig.update_layout(title=f"{name} per head, over runs", xaxis_title="head", yaxis_title=name, showlegend=False)
        section.blocks.append(Figure(f"sweep/head_scores/{name}", _style(fig, 380)))
        rows += [[head, name, e["mean"], e["std"], len(e["values"])] for head, e in per_head.items()]
    if rows:
        section.blocks.append(Table(["head", "score", "mean", "std", "runs"], rows, sortable=True))
    else:
        section.blocks.append(Note("No finished run has attention or circuits scores.", "warn"))
    return section


def failed(data: dict) -> Section:
    rows = [[f["num"], f["label"], f["status"], f.get("error") or "—"] for f in data["failed"]]
    blocks = [Table(["run", "label", "status", "error"], rows)] if rows else [Note("Every run finished.", "pass")]
    return Section("failed", "Runs that did not finish", (
        "Failed runs (with the error's one line), interrupted ones (their process died) and ones not run yet. "
        "Re-running the sweep command with hydra.sweep.dir=<this sweep> retries them; finished runs are skipped."),
        blocks)


def build_sections(data: dict) -> list[Section]:
    sections = [overview(data), curves(data), metrics(data), ablation(data), heads(data), failed(data)]
    used: set[str] = set()
    data["figures"] = []
    for s in sections:
        for b in s.blocks:
            if isinstance(b, Figure):
                b.id = _unique_id("fig-" + "".join(c if c.isalnum() else "-" for c in b.name), used)
                data["figures"].append({"id": b.id, "name": b.name, "section": s.id, "title": _title(b.fig)})
    data["sections"] = [{"id": s.id, "title": s.title} for s in sections]
    return sections


# --- the page ------------------------------------------------------------------------------------
def render(data: dict, sections: list[Section], plotly_js: str | None = None) -> str:
    """The page (``plotly_js``: inline it, for a single self-contained file such as wandb's copy)."""
    import plotly.io as pio

    scripts: list[str] = []
    toc, parts = [], []
    for n, s in enumerate(sections, 1):
        toc.append(f'<li><a href="#{s.id}">{html.escape(s.title)}</a></li>')
        parts.append(f'<section id="{s.id}"><h2>{n}. {html.escape(s.title)}</h2>'
                     f'<p class="intro">{html.escape(s.intro)}</p>{rh._blocks(s.blocks, scripts)}</section>')
    template = pio.templates[pio.templates.default].to_plotly_json()
    tag = f"<script>{plotly_js}</script>" if plotly_js is not None else f'<script src="{rh.PLOTLY_JS}"></script>'
    c = data["sweep"]["counts"]
    sub = f"{data['sweep']['dir']} · " + ", ".join(f"{v} {k}" for k, v in c.items() if v)
    return "".join([
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{TITLE}</title><style>{rh._CSS}</style>{tag}</head><body>",
        f'<header><h1>{TITLE}</h1><div class="sub">{html.escape(sub)}</div></header>',
        f'<div class="layout"><nav class="toc"><h2>Contents</h2><ol>{"".join(toc)}</ol></nav>',
        f"<main>{''.join(parts)}</main></div>",
        "<footer>Made by toylens-sweep-report. report.json holds every number on this page; ablation.csv the "
        "per-hook summary; ../sweep.json the index of runs.</footer>",
        f'<script type="application/json" id="tl-template">{rh._script_json(template)}</script>',
        "".join(scripts), f"<script>{rh._JS}</script></body></html>",
    ])


def ablation_csv(data: dict) -> str:
    a = data["ablation"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["hook", "mean_delta_loss", "std", "min", "max", "top_k_fraction",
                *[f"run_{n}" for n in a.get("runs", [])]])
    for i, h in enumerate(a.get("hooks", [])):
        w.writerow([h, a["mean"][i], a["std"][i], a["min"][i], a["max"][i], a["top_k_fraction"][i],
                    *[row[i] for row in a["delta_loss"]]])
    return buf.getvalue()


def write_page(out_dir: Path, data: dict, sections: list[Section]) -> Path:
    """Write ``out_dir/{index.html, report.json, ablation.csv, plotly.min.js}`` atomically; returns index.html.
    Like a run's report: only a folder toylens wrote is replaced, one writer at a time (``folder.swap_in``)."""
    from plotly.offline import get_plotlyjs

    out_dir = Path(out_dir)
    page, body = render(data, sections), rh.dumps(data)  # both before anything is written
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        os.chmod(tmp, 0o755)
        (tmp / rh.PLOTLY_JS).write_text(get_plotlyjs(), encoding="utf-8")
        (tmp / "report.json").write_text(body, encoding="utf-8")
        (tmp / "ablation.csv").write_text(ablation_csv(data), encoding="utf-8")
        (tmp / "index.html").write_text(page, encoding="utf-8")
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / "index.html"


def log_to_wandb(sweep_dir: Path, data: dict, sections: list[Section], logger_cfg) -> str:
    """One wandb run for the sweep report, in the runs' group (offline without a login): summary
    numbers, the metrics and ablation tables, and the page. Returns its id."""
    import dataclasses

    from plotly.offline import get_plotlyjs

    from toylens.report.wandb_log import summary_numbers
    from toylens.runs.loggers import WandbLogger

    lcfg = dataclasses.replace(logger_cfg, tags=[*logger_cfg.tags, "sweep-report"])
    logger = WandbLogger(lcfg, sweep_dir, {"sweep": data["sweep"], "settings": data["settings"]})
    try:
        wandb = logger.wandb
        a = data["ablation"]
        summary = summary_numbers({"sweep": data["sweep"]["counts"],
                                   "ablation": {"spearman_mean": a.get("spearman_mean"), "top_k": a.get("top_k")}},
                                  prefix="sweep_report/")
        logger.run.summary.update(summary)
        metrics_table = next(b for s in sections if s.id == "metrics" for b in s.blocks if isinstance(b, Table))
        media = {"sweep_report/page": wandb.Html(render(data, sections, plotly_js=get_plotlyjs()), inject=False),
                 "sweep_report/runs": wandb.Table(columns=metrics_table.columns,
                                                  data=[[_nan(v) for v in r] for r in metrics_table.rows])}
        if a:
            media["sweep_report/ablation"] = wandb.Table(
                columns=["hook", "mean_delta_loss", "std", "top_k_fraction"],
                data=[[h, a["mean"][i], _nan(a["std"][i]), a["top_k_fraction"][i]] for i, h in enumerate(a["hooks"])])
        logger.run.log(media)
        return logger.id
    finally:
        logger.close()
