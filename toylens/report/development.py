"""Development over training, in the "Training dynamics" section (``over=checkpoints dynamics.analyses=[llc]``):
the local learning coefficient at every checkpoint (``toylens.analyze.learning_coefficient``) with its chain-health
warnings, and the stages read off the LLC curve (``toylens.analyze.stages``, as Hoogland et al. read them) on one
step axis with the loss, the heads' scores, each circuit edge's formation step and, for modular_add, the restricted
and excluded losses. report.json: ``dynamics.llc`` (every number, the per-chain traces) and ``development.stages``
(each stage's steps and what changed in it); the traces also go to ``dynamics/llc.zarr`` (xarray, dims step, chain,
draw) in the report folder."""

from __future__ import annotations

import sys

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from toylens.report.page import Figure, Note, Table
from toylens.result import jsonable

LLC_FILE = "dynamics/llc.zarr"
STAGE_SCORES = ("previous_token", "induction")  # head scores whose formation a stage reports


def llc_blocks(ctx, steps) -> tuple[list, object]:
    """The LLC at every checkpoint (``ctx.cfg.llc``): its curve, the chains' traces, one warning per chain-health
    problem naming the ``llc.*`` key to change. Returns the blocks and the ``LLCDynamics``."""
    from toylens.analyze.learning_coefficient import llc_over_checkpoints

    cfg = ctx.cfg.llc
    if ctx.cfg.progress:
        how = "calibrating the step size, then " if cfg.lr is None else ""
        print(f"toylens-analyze: LLC over checkpoints ({how}{cfg.num_chains} chains each) ...", file=sys.stderr,
              flush=True)
    res = llc_over_checkpoints(ctx.run, steps, cfg, device=ctx.device, progress=ctx.cfg.progress)
    st = res.settings
    d = jsonable(res.to_dict())
    d["file"] = LLC_FILE
    ctx.data.setdefault("dynamics", {})["llc"] = d
    # zarr format 2 with consolidated metadata: what xarray.open_zarr reads fastest, and zarr 2 readers too
    ctx.files[LLC_FILE] = lambda path: res.to_xarray().to_zarr(str(path), mode="w", zarr_format=2, consolidated=True)
    blocks: list = ["Local learning coefficient (LLC)"]
    blocks += health_notes(res.warnings, res.steps)
    mean = res.llc_mean.tolist()
    blocks.append(Note(
        f"LLC by SGLD (devinterp) on the task's own loss over {cfg.n_rows} fixed rows of its training distribution: "
        f"{mean[0]:.3g} at step {res.steps[0]}, {max(mean):.3g} at most (step {res.steps[mean.index(max(mean))]}), "
        f"{mean[-1]:.3g} at step {res.steps[-1]}; {res.seconds_per_checkpoint:.1f} s per checkpoint. Settings: "
        f"llc.lr={st['lr']:g}{_pilots_text(st.get('lr_pilots'))}, llc.n_beta={st['n_beta']:g}, "
        f"llc.localization={st['localization']:g}, {st['num_chains']} chains x {st['num_draws']} draws"
        f"{' (ε x draws held at 64 x 1e-4)' if cfg.num_draws is None else ''}; traces in {LLC_FILE}.", "info"))
    figs = res.figures()
    figs["llc/traces"] = _traces_figure(res)
    for name, fig in figs.items():
        fig.update_layout(height=400, margin=dict(l=60, r=20, t=56, b=50), title_font_size=14, title_x=0.02)
        blocks.append(Figure(f"dynamics/{name}", fig))
    return blocks, res


def _pilots_text(pilots) -> str:
    if not pilots:
        return ""
    tried = ", ".join(f"{p['lr']:g} {'ok' if p['ok'] else '/'.join(p['checks'])}" for p in pilots)
    return f" (calibrated on the last checkpoint: {tried})"


def health_notes(warnings: dict, steps: list[int]) -> list[Note]:
    """One warning per kind of chain-health problem, with the checkpoints it hit; a pass note when none did."""
    by_check: dict[str, tuple[str, list[int]]] = {}
    for step in sorted(warnings):
        for w in warnings[step]:
            text, hit = by_check.setdefault(w["check"], (w["text"], []))
            hit.append(step)
    if not by_check:
        return [Note(f"Chain health: at all {len(steps)} checkpoints the chains stayed near the checkpoint (no "
                     f"divergence), moved, took steps small against their noise and settled.", "pass")]
    after = {"negative": "Before the loss settles into a minimum (early in training) this is expected: read those "
                         "points as 'not at a minimum', not as a value."}
    return [Note(f"LLC chain health ({check}) at {len(hit)} of {len(steps)} checkpoints (steps "
                 f"{', '.join(map(str, hit[:8]))}{' ...' if len(hit) > 8 else ''}): {text}. "
                 + after.get(check, "The curve there is not to be trusted until this is fixed."), "warn")
            for check, (text, hit) in by_check.items()]


def _traces_figure(res) -> go.Figure:
    """Each checkpoint's chain-mean loss trace minus its init loss, against the draw (a settled chain is flat)."""
    n = len(res.steps)
    fig = go.Figure()
    for i, step in enumerate(res.steps):
        t = res.loss_trace[i].mean(0) - res.init_loss[i]
        shade = int(40 + 180 * i / max(1, n - 1))
        fig.add_trace(go.Scatter(y=t.tolist(), mode="lines", name=f"step {step}", line=dict(color=f"rgb({shade},"
                                 f"{80},{255 - shade})", width=1)))
    fig.update_layout(title="SGLD loss minus the checkpoint's loss, mean over chains (one line per checkpoint)",
                      xaxis_title="draw", yaxis_title="L(w) - L(w*)")
    return fig


def development_blocks(ctx, res, llc_res, data: dict) -> list:
    """Stages of the LLC curve with what changed in each (``ctx.data["development"]``) and the shared-axis figure.
    ``res``: the ``DynamicsResult``; ``data``: report.json's ``dynamics`` (for the circuit edges' formation)."""
    from toylens.analyze.stages import describe, find_stages, formation_steps, overlapping, stage_events

    steps = list(res.steps)
    llc = llc_res.usable_mean()  # diverged checkpoints: NaN, read by nothing below
    n = len(steps)
    bad = llc_res.diverged_steps()
    if len(bad) * 4 > n or n - len(bad) < 3:  # a curve with holes that large has no stages to read
        why = (f"the LLC chains diverged at {len(bad)} of {n} checkpoints (steps {', '.join(map(str, bad[:8]))}"
               f"{' ...' if len(bad) > 8 else ''}); lower llc.lr (or leave it null to calibrate) and run again")
        ctx.data["development"] = {"signal": "llc", "stages": [], "skipped": why}
        return ["Development: stages of the LLC beside the circuit that forms",
                Note(f"Stages not read: {why}.", "warn")]
    keep = [i for i, v in enumerate(llc) if v == v]
    heads = _head_series(res)
    formed = formation_steps(steps, heads)
    grok = (ctx.data.get("dynamics_canon") or {}).get("grokking")
    signals = {"loss": res.loss.tolist(), **{k: heads[k] for k in formed}}
    if grok and grok.get("steps") != steps:
        grok = None  # computed on other checkpoints: nothing to line up
    if grok:
        signals |= {k: v for k, v in grok["losses"].items() if k.startswith(("restricted", "excluded"))}
    edges = (data.get("discovery") or {}).get("formed_at") or {}
    ksteps = [steps[i] for i in keep]  # the stages are read off the usable checkpoints only
    stages = stage_events(describe(find_stages(ksteps, [llc[i] for i in keep]), ksteps,
                                   {k: [v[i] for i in keep] for k, v in signals.items()}),
                          {"heads_formed": formed, "edges_formed": edges})
    loss = res.loss.tolist()
    phases = {k: v for k, v in (grok or {}).get("phases", {}).items() if k != "note"}
    for st in stages:
        a, b = steps.index(st["from_step"]), steps.index(st["to_step"])
        st["loss_from"], st["loss_to"], st["loss_drop"] = loss[a], loss[b], loss[a] - loss[b]
        if phases:
            st["grokking_phases"] = overlapping(st, phases)
        st["text"] = _stage_text(st)
    ctx.data["development"] = {
        "signal": "llc", "stages": stages, "boundaries": [st["from_step"] for st in stages[1:]],
        "left_out_steps": bad,
        "heads_formed": formed, "edges_formed": edges,
        "rules": "stages: the LLC curve smoothed over 3 checkpoints, each checkpoint labelled rising/falling/plateau "
                 "(|slope| <= 0.5 x the mean |slope|), runs shorter than 2 checkpoints merged, a boundary at the "
                 "last checkpoint of a run; a head forms a score when it rises >= 0.2, at the first checkpoint "
                 "with half its rise; an edge forms at half its final |score|"}
    blocks: list = ["Development: stages of the LLC beside the circuit that forms"]
    if bad:
        blocks.append(Note(f"The LLC chains diverged at {len(bad)} of {n} checkpoints (steps "
                           f"{', '.join(map(str, bad))}): left out of the curve and the stages.", "warn"))
    if n < 5:
        blocks.append(Note(f"Only {n} checkpoints: too few to read stages off a curve; save more (e.g. "
                           f"train.checkpoint_every=25 train.keep_last=1000).", "warn"))
    blocks.append(Table(["stage", "steps", "LLC", "loss", "heads formed", "edges formed"],
                        [[f"{k + 1}: {st['kind']}", f"{st['from_step']}–{st['to_step']}",
                          f"{st['start']:.3g} → {st['end']:.3g}", f"{st['loss_from']:.3g} → {st['loss_to']:.3g}",
                          _few(f"{h['name']} ({h['step']})" for h in st["heads_formed"]),
                          _few(f"{e['name']} ({e['step']})" for e in st["edges_formed"])]
                         for k, st in enumerate(stages)],
                        caption="Stages of the smoothed LLC curve (report.json development.stages); a stage's "
                                "events are those whose formation step falls in it"))
    blocks.append(Figure("development/shared_axis", shared_axis_figure(steps, llc_res, res, heads, formed, edges,
                                                                      grok, stages), wide=True))
    return blocks


def _head_series(res) -> dict[str, list[float]]:
    n = len(res.steps)
    out = {}
    for score in STAGE_SCORES:
        s = res.head_scores.get(score)
        if s is not None:
            flat = s.reshape(n, -1)
            out |= {f"{h} {score}": flat[:, i].tolist() for i, h in enumerate(res.head_labels)}
    return out


def _few(items, limit: int = 6) -> str:
    """The first ``limit`` of ``items``, then how many more (report.json lists them all)."""
    items = list(items)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return (", ".join(items[:limit]) + more) or "—"


def _stage_text(st: dict) -> str:
    parts = [f"steps {st['from_step']}–{st['to_step']}: LLC {st['kind']} ({st['start']:.3g} → {st['end']:.3g})",
             f"loss {st['loss_from']:.3g} → {st['loss_to']:.3g}"]
    if st["heads_formed"]:
        parts.append("formed: " + _few(f"{h['name']} at {h['step']}" for h in st["heads_formed"]))
    if st["edges_formed"]:
        parts.append("edges: " + _few(f"{e['name']} at {e['step']}" for e in st["edges_formed"]))
    if st.get("grokking_phases"):
        parts.append("grokking: " + ", ".join(p.replace("_", " ") for p in st["grokking_phases"]))
    return "; ".join(parts)


def shared_axis_figure(steps, llc_res, res, heads, formed, edges, grok, stages) -> go.Figure:
    """Rows on one step axis: the LLC (± std over chains; per component when computed), the loss (and modular_add's
    restricted/excluded losses), the scores of the heads that formed, and each circuit edge's formation step;
    the stage boundaries as dashed lines through every row."""
    rows = [("LLC", "LLC")]
    if llc_res.components:
        rows.append(("LLC per component", "LLC"))
    rows.append(("loss", "loss"))
    if formed:
        rows.append(("head scores (heads that formed)", "score"))
    formed_edges = {e: s for e, s in edges.items() if s is not None}
    if formed_edges:
        rows.append(("edges of the final circuit formed at each checkpoint", "edges"))
    fig = make_subplots(rows=len(rows), cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=[r[0] for r in rows])
    at = {name: i + 1 for i, (name, _) in enumerate(rows)}
    mean, std = llc_res.usable_mean(), llc_res.llc_std.tolist()
    fig.add_trace(go.Scatter(x=steps, y=mean, mode="lines+markers", name="LLC",
                             error_y=dict(type="data", array=std, visible=True)), row=1, col=1)
    for c, v in llc_res.components.items():
        fig.add_trace(go.Scatter(x=steps, y=v.tolist(), mode="lines", name=f"LLC {c}"), row=at["LLC per component"],
                      col=1)
    fig.add_trace(go.Scatter(x=steps, y=res.loss.tolist(), mode="lines+markers", name="loss (evaluation batch)"),
                  row=at["loss"], col=1)
    if grok:  # Nanda et al.'s phases, as located by the canon section, shaded in the loss row
        colors = {"memorisation": "rgba(31,119,180,0.10)", "circuit_formation": "rgba(255,127,14,0.12)",
                  "cleanup": "rgba(44,160,44,0.12)"}
        for name, color in colors.items():
            span = (grok.get("phases") or {}).get(name)
            if span:
                fig.add_vrect(x0=span[0], x1=span[1], fillcolor=color, line_width=0, row=at["loss"], col=1,
                              annotation_text=name.replace("_", " "), annotation_position="bottom left",
                              annotation_font_size=10)
        for k, v in grok["losses"].items():
            if k.startswith(("restricted", "excluded")):
                fig.add_trace(go.Scatter(x=grok["steps"], y=v, mode="lines", name=k, line=dict(dash="dot")),
                              row=at["loss"], col=1)
    if bool((res.loss > 0).all()):
        fig.update_yaxes(type="log", row=at["loss"], col=1)
    for name in formed:
        fig.add_trace(go.Scatter(x=steps, y=heads[name], mode="lines", name=name), row=at["head scores (heads "
                                                                                         "that formed)"], col=1)
    if formed_edges:  # a bar per checkpoint (how many edges formed there; hover: which), and the running total
        by_step: dict[int, list[str]] = {}
        for e, s in formed_edges.items():
            by_step.setdefault(s, []).append(e)
        xs = sorted(by_step)
        row = at["edges of the final circuit formed at each checkpoint"]
        fig.add_trace(go.Bar(x=xs, y=[len(by_step[x]) for x in xs], name="edges formed",
                             hovertext=["<br>".join(sorted(by_step[x])[:20]) for x in xs], hoverinfo="x+y+text"),
                      row=row, col=1)
        total = [sum(len(v) for k, v in by_step.items() if k <= x) for x in steps]
        fig.add_trace(go.Scatter(x=steps, y=total, mode="lines", name="edges formed so far", line=dict(dash="dot")),
                      row=row, col=1)
    for i, (_, ytitle) in enumerate(rows):
        fig.update_yaxes(title_text=ytitle, row=i + 1, col=1)
    for k, st in enumerate(stages):
        if k:
            fig.add_vline(x=st["from_step"], line=dict(dash="dash", color="gray", width=1))
        fig.add_annotation(x=(st["from_step"] + st["to_step"]) / 2, y=0.98, xref="x", yref="y domain",
                           yanchor="top", text=st["kind"], showarrow=False, font=dict(size=11, color="gray"))
    fig.update_layout(title=dict(text="Development on one step axis: LLC stages (dashed), loss, heads, circuit edges",
                                 y=0.995, yanchor="top"),
                      height=250 * len(rows) + 80, margin=dict(l=70, r=20, t=90, b=50),
                      title_font_size=14, title_x=0.02)
    fig.update_xaxes(title_text="step", row=len(rows), col=1)
    return fig
