"""The SAE report page (``<run>/sae/<hook>/report/index.html``): headline numbers (CE loss recovered, L0,
explained variance), training curves, the latent density histogram and one card per top latent."""

from __future__ import annotations

import math

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from toylens.analyze.sae.pipeline import SAEResult
from toylens.report.page import Figure, Note, Report, Section, Table


def _fmt(v: float, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def headline(r: SAEResult) -> str:
    e = r.eval
    return (f"CE loss recovered {_fmt(e.ce_loss_recovered)}, L0 {_fmt(e.l0, 1)} of {r.settings.d_sae} latents, "
            f"explained variance {_fmt(e.explained_variance)}")


def _summary(r: SAEResult, run_name: str) -> Section:
    e, s = r.eval, r.settings
    rec = e.ce_loss_recovered
    kind = "pass" if math.isfinite(rec) and rec >= 0.9 else ("warn" if math.isfinite(rec) and rec >= 0.5 else "fail")
    rows = [["CE loss recovered", e.ce_loss_recovered], ["L0 (mean active latents per activation)", e.l0],
            ["explained variance", e.explained_variance], ["MSE per element", e.mse],
            ["task loss, clean", e.ce_clean], ["task loss, SAE spliced in", e.ce_spliced],
            ["task loss, hook zero-ablated", e.ce_zero_ablation],
            ["dead latents (never fire on the evaluation sequences)", e.dead_latents],
            ["evaluation activations", e.n_activations], ["training activations", r.n_train_activations],
            ["training wall time (s)", r.train_seconds], ["training CPU time (s, all threads)", r.train_cpu_seconds],
            ["wall seconds per 1M training activations", r.seconds_per_million]]
    settings = [[k, v] for k, v in s.to_dict().items()] + [["checkpoint step", r.step], ["d_in", r.d_in]]
    return Section("summary", "Summary", (
        f"A standard SAE (ReLU, L1 penalty) trained by SAELens on {r.hook} of {run_name}, evaluated on held-out "
        "sequences of the run's task. CE loss recovered = (CE_zero_ablation − CE_spliced) / (CE_zero_ablation − "
        "CE_clean), with CE the task's own loss (cross-entropy of its targets at its loss positions): 1 means the "
        "SAE's reconstruction serves the model as well as the real activation, 0 as badly as zeros."),
        [Note(headline(r), kind),
         Table(["metric", "value"], rows, caption="SAE quality (evaluation sequences)"),
         Table(["setting", "value"], settings, caption="settings (toylens-sae key=value)")])


def _curves(r: SAEResult) -> Section:
    c = r.curves
    fig = make_subplots(rows=1, cols=4, subplot_titles=["MSE per element", "explained variance", "L0",
                                                        "dead latents"])
    for i, (ys, name) in enumerate([(c.mse, "mse"), (c.explained_variance, "explained variance"), (c.l0, "L0"),
                                    (c.dead, "dead latents")]):
        fig.add_trace(go.Scatter(x=c.step, y=ys, mode="lines", name=name, showlegend=False), row=1, col=i + 1)
        fig.update_xaxes(title_text="SAE step", row=1, col=i + 1)
    fig.update_layout(title="Training curves", height=330, margin=dict(l=40, r=20, b=50))
    return Section("curves", "Training curves", (
        "Recorded from SAELens's own training forward pass every few steps, on the training batch in SAELens's "
        "normalized units (activations scaled to mean norm √d_in). Dead: latents that have not fired for "
        f"{r.settings.dead_window} steps."), [Figure("sae/curves", fig, wide=True)])


def _density(r: SAEResult) -> Section:
    dens = [d for d in r.density if d > 0]
    logs = [math.log10(d) for d in dens]
    fig = go.Figure(go.Histogram(x=logs, nbinsx=40))
    fig.update_layout(title=f"Latent density ({len(r.density) - len(dens)} latents never fire, not shown)",
                      xaxis_title="log10(fraction of activations where the latent fires)", yaxis_title="latents",
                      height=330)
    return Section("density", "Latent density", (
        "How often each latent fires on the evaluation sequences. Healthy SAEs have most latents between 1e-4 "
        "and 1e-1; a bump near 0 (log10 ≈ 0) means dense latents that fire almost everywhere."),
        [Figure("sae/density", fig)])


def _card_blocks(r: SAEResult) -> list:
    blocks: list = []
    for c in r.cards:
        blocks.append(f"Latent {c.latent}: fires on {100 * c.density:.2f}% of activations, max activation "
                      f"{c.max_activation:.3f}; ablating it changes the task loss by {c.delta_loss:+.4f}.")
        top = [[t["activation"], t["context"], t["row"], t["pos"]] for t in c.top]
        blocks.append(Table(["activation", "context (…, [token])", "sequence", "position"], top,
                            caption=f"latent {c.latent}: top-activating positions"))
        if c.promoted:
            blocks.append(Table(["promoted", "logit", "suppressed", "logit "],
                                [[p["token"], p["logit"], q["token"], q["logit"]]
                                 for p, q in zip(c.promoted, c.suppressed, strict=True)],
                                caption=f"latent {c.latent}: tokens its decoder direction promotes (direct path)"))
    return blocks


def _cards(r: SAEResult) -> Section:
    note = ("Promoted tokens: the decoder direction's direct effect on each logit through ln_final (weight and "
            "centring, scale frozen) and W_U, relative to the mean logit; later layers are not included."
            if any(c.promoted for c in r.cards) else
            f"{r.hook} is not in the residual stream, so no tokens are shown as promoted.")
    return Section("latents", "Top latents", (
        "The latents that carry most of the reconstruction (sum of activation × decoder norm). For each: where it "
        "fires most (the token in brackets, with the tokens before it), and the change of the task loss when its "
        "contribution f(x)·W_dec is subtracted from the real activation (every other latent and the SAE's error "
        "left in place). " + note), _card_blocks(r) or [Note("no latent fires on the evaluation sequences", "warn")])


def sae_report(r: SAEResult, run_name: str, run_path: str = "", task: str = "?") -> Report:
    """The page of one SAE; ``report.json`` holds ``SAEResult.to_dict()`` (every number on the page)."""
    e = r.eval
    glance = [["CE loss recovered", e.ce_loss_recovered], ["L0", e.l0], ["explained variance", e.explained_variance],
              ["hook", r.hook], ["latents (d_sae)", r.settings.d_sae], ["dead latents", e.dead_latents]]
    data = {"run": {"name": run_name, "path": run_path, "step": r.step, "task": {"name": task}},
            "header": f"{run_path} · checkpoint step {r.step} · task {task} · SAE on {r.hook}",
            "highlights": {"rows": glance}, "headline": headline(r), **r.to_dict()}
    rep = Report(title=f"SAE on {r.hook}", run_name=f"{run_name} · {r.hook}", data=data,
                 sections=[_summary(r, run_name), _curves(r), _density(r), _cards(r)])
    for i, f in enumerate(rep.figures()):
        f.id = f"fig{i}"
    return rep
