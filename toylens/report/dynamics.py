"""The report's "Training dynamics" section (``toylens-analyze run=<dir> over=checkpoints``): the
analyses of ``toylens.analyze.dynamics`` on every saved checkpoint, plotted against the step."""

from __future__ import annotations

import sys

import plotly.graph_objects as go

from toylens.report.page import Figure, Note, Section, Table
from toylens.result import jsonable


def dynamics(ctx) -> Section:
    from toylens.analyze.dynamics import FORMED_AT, checkpoint_dynamics

    cfg = ctx.cfg
    d = cfg.dynamics
    steps = d.steps if d.steps else None
    if cfg.progress:
        print(f"toylens-analyze: dynamics over {len(steps or ctx.run.steps)} checkpoints ...", file=sys.stderr,
              flush=True)
    from toylens.report.registry import DYNAMICS_BUILTINS, call_user, resolve_dynamics

    users = resolve_dynamics(list(d.analyses))  # the user's analyses, called on each checkpoint's model
    res = checkpoint_dynamics(ctx.run, ctx.batch, reference=ctx.reference if "ablation" in d.analyses else None,
                              steps=steps, analyses=[a for a in d.analyses if a in DYNAMICS_BUILTINS
                                                     and a not in ("discovery", "llc")],
                              per_head=cfg.ablation.per_head,
                              chunk_size=cfg.chunk_size, ablation_chunk_rows=cfg.ablation.chunk_rows,
                              device=ctx.device, progress=cfg.progress,
                              per_checkpoint={s.name: (lambda model, step, s=s: call_user(s, model, ctx.run, ctx.batch))
                                              for s in users})
    data = jsonable(res.to_dict())
    losses = res.loss.tolist()
    drops = [(losses[i] - losses[i + 1], res.steps[i + 1]) for i in range(len(losses) - 1)]
    data["largest_loss_drop"] = ({"to_step": max(drops)[1], "drop": max(drops)[0]} if drops else None)
    ctx.data["dynamics"] = data
    section = Section("dynamics", "Training dynamics (every saved checkpoint)", (
        "The same analyses on each saved checkpoint, with one evaluation batch for all of them: the loss, each "
        "head's previous-token (and other) scores, OV copying scores and the every-hook ablation (and, when asked "
        "for, when each circuit edge forms and the local learning coefficient with the stages read off it). Read "
        "when the loss drops, when a head takes on its role and which activations start to matter."))
    n = len(res.steps)
    kept = ctx.run.config.train.keep_last
    if n < 4:
        section.blocks.append(Note(
            f"Only {n} checkpoint(s) on disk (steps {res.steps}); this run kept its newest train.keep_last={kept}. "
            f"Train with e.g. train.checkpoint_every=25 train.keep_last=1000 to see the dynamics.", "warn"))
    formed = data["previous_token_formed_at"]
    summary = [["checkpoints", f"{n} (steps {res.steps[0]} to {res.steps[-1]})"],
               ["loss at first / last checkpoint", f"{losses[0]:.4g} / {losses[-1]:.4g}"]]
    if data["largest_loss_drop"]:
        summary.append(["largest loss drop between checkpoints",
                        f"{data['largest_loss_drop']['drop']:.4g}, by step {data['largest_loss_drop']['to_step']}"])
    if res.head_scores:
        if formed:
            i = res.head_labels.index(formed["head"])
            s = res.head_scores["previous_token"].reshape(n, -1)[:, i]
            text = (f"{formed['head']} at step {formed['step']} (previous_token score {float(s[0]):.3g} at the "
                    f"first checkpoint, {float(s.max()):.3g} at most)")
        else:
            text = "no head's previous_token score rises"
        summary.append([f"previous-token head formed ({FORMED_AT:.0%} of its rise)", text])
    section.blocks.append(Table(["", "value"], summary))
    from toylens.report.canon import canon_dynamics_blocks  # induction / grokking runs: their finding first

    canon = canon_dynamics_blocks(ctx)
    if "discovery" in d.analyses:  # when each edge of the final circuit forms
        from toylens.report.discovery import discovery_dynamics_blocks

        canon = canon + discovery_dynamics_blocks(ctx, steps)
    if "llc" in d.analyses:  # the LLC, then the stages read off it beside everything above
        from toylens.report.development import development_blocks, llc_blocks

        llc_part, llc_res = llc_blocks(ctx, steps)
        canon = canon + development_blocks(ctx, res, llc_res, ctx.data["dynamics"]) + llc_part
    for spec in users:  # the user's analyses: their scalars against the step
        section.blocks += user_dynamics_blocks(ctx, data, spec, res.steps, res.per_checkpoint[spec.name])
    if canon:
        section.blocks += [*canon, "Every head and hook over training"]
    figs = res.figures()
    metrics = [(r["step"], r["eval/loss"]) for r in ctx.run.metrics if isinstance(r.get("eval/loss"), (int, float))]
    if metrics:  # the training log's denser eval/loss, behind the checkpoints' own points
        figs["dynamics/loss"].add_trace(go.Scatter(x=[m[0] for m in metrics], y=[m[1] for m in metrics],
                                                   mode="lines", name="eval/loss (metrics.jsonl)", opacity=0.5))
    order = ["dynamics/loss", "dynamics/previous_token", "dynamics/accuracy", "dynamics/copying_score",
             "dynamics/ablation_top", "dynamics/induction", "dynamics/current_token", "dynamics/first_token",
             "dynamics/duplicate_token"]
    for name in order + [k for k in figs if k not in order]:
        if name in figs:
            fig = figs[name]
            wide = name == "dynamics/ablation"
            height = 160 + 16 * len(res.ablation_hooks) if wide else 400
            fig.update_layout(height=height, margin=dict(l=60 if not wide else 220, r=20, t=56, b=50),
                              title_font_size=14, title_x=0.02)
            section.blocks.append(Figure(name, fig, wide=wide))
    if res.head_scores:
        section.blocks.append(Table(["step", *res.head_labels],
                                    [[s, *res.head_scores["previous_token"][i].reshape(-1).tolist()]
                                     for i, s in enumerate(res.steps)], sortable=True,
                                    caption="previous_token score of each head at each checkpoint"))
    return section


def user_dynamics_blocks(ctx, data: dict, spec, steps: list[int], values: list) -> list:
    """A user's analysis over checkpoints: ``data[name] = {"steps": [...], "<scalar>": [...]}`` (None where a step
    failed or lacked it), a figure with a line per scalar, a warning (and an errors entry) per failed step."""
    from toylens.report.registry import error_line, scalar_leaves, split_output

    rows, failed = [], []
    for step, v in zip(steps, values, strict=True):
        try:
            if isinstance(v, BaseException):
                raise v
            rows.append(scalar_leaves(split_output(v, f"analysis {spec.name} at step {step}")[0]))
        except Exception as e:
            rows.append({})
            failed.append((step, error_line(e)))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    series = {"steps": steps, **{k: [r.get(k) for r in rows] for k in keys}}
    data[spec.name] = series
    ctx.data.setdefault("origins", {})[spec.name] = spec.origin.to_dict()
    blocks: list = []
    for step, line in failed:
        ctx.data.setdefault("errors", []).append({"analysis": f"dynamics/{spec.name}", "step": step, "error": line})
        blocks.append(Note(f"{spec.name} failed at step {step}: {line}", "warn"))
    fig = go.Figure([go.Scatter(x=steps, y=series[k], mode="lines+markers", name=k) for k in keys])
    fig.update_layout(title=f"{spec.title} ({spec.origin.ref}) against the step", xaxis_title="step",
                      height=400, margin=dict(l=60, r=20, t=56, b=50), title_font_size=14, title_x=0.02)
    blocks.append(Figure(f"dynamics/{spec.name}", fig))
    return blocks
