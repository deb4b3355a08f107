"""One builder per report section. Each runs its analysis, stores every number it shows in
``ctx.data[<section>]`` (which becomes report.json) and returns a ``Section`` of figures, tables and
short explanations. Which builder makes which section, and when it applies: toylens/report/registry.py."""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import plotly.graph_objects as go
import torch

from toylens.report.card import overview, training  # noqa: F401  (builders of the first two sections)
from toylens.report.config import AnalyzeConfig
from toylens.report.page import Figure, Note, Section, Table
from toylens.result import jsonable
from toylens.runs.run import Run


@dataclass
class Context:
    run: Run
    cfg: AnalyzeConfig
    model: Any  # HookedTransformer, as trained
    step: int
    device: str
    data: dict = field(default_factory=lambda: {"toylens_report": 1, "timings_s": {}})
    folded: Any = None  # the folded model once the fold check passed
    ablation: Any = None  # AblationResult, for ablation.csv and wandb
    cache: dict = field(default_factory=dict)  # values several sections share (report_interventions: pairs)
    files: dict = field(default_factory=dict)  # more files for the report folder: relative path -> writer(path)

    @functools.cached_property
    def batch(self):
        return self.run.batch(self.cfg.batch.size, self.cfg.batch.seed, self.device)

    @functools.cached_property
    def reference(self):
        return self.run.batch(self.cfg.reference.size, self.cfg.reference.seed, self.device)

    @property
    def kw(self) -> dict:
        return {"chunk_size": self.cfg.chunk_size, "progress": self.cfg.progress}


def _style(fig: go.Figure, height: int = 400, bottom: int = 50) -> go.Figure:
    fig.update_layout(height=height, margin=dict(l=60, r=20, t=56, b=bottom), title_font_size=14,
                      title_x=0.02)
    return fig


def _pick(figs: dict, prefix: str, **style) -> list[Figure]:
    return [Figure(name, _style(fig, **style)) for name, fig in figs.items() if name.startswith(prefix)]


# --- fold ----------------------------------------------------------------------------------------
def _run_fold(ctx: Context) -> dict:
    from toylens.model.fold import FoldCheckError
    from toylens.model.fold import fold as fold_fn

    tol = ctx.cfg.fold_tol
    try:  # tol=inf: fold always returns its measurement; pass/fail is decided here, against fold_tol
        res = fold_fn(ctx.model, ctx.batch, tol=math.inf, **ctx.kw)
    except FoldCheckError as e:  # NaN difference, or W_pos no longer zero after folding
        ctx.data["fold"] = {"passed": False, "tol": tol, "max_abs_logprob_diff": None, "error": str(e)}
        return ctx.data["fold"]
    d = res.to_dict()
    d.update(tol=tol, passed=res.max_abs_logprob_diff <= tol)
    ctx.folded = res.model if d["passed"] else None
    ctx.data["fold"] = jsonable(d)
    return ctx.data["fold"]


def fold(ctx: Context) -> Section:
    d = _run_fold(ctx)
    section = Section("fold", "LayerNorm folding check", (
        "Folding moves each LayerNorm's weights into the matrices that read from it, so circuits such as "
        "W_E W_Q W_K^T W_E^T are what the model really computes. It should not change the model: the "
        "number below is the largest difference in log-probability between the folded and original model "
        "over every token of the evaluation batch."))
    if d.get("error"):
        section.blocks.append(Note(f"FAIL: {d['error']}", "fail"))
        return section
    diff, ok = d["max_abs_logprob_diff"], d["passed"]
    section.blocks.append(Note(
        f"{'PASS' if ok else 'FAIL'}: max |Δ log-prob| = {diff:.3g} "
        f"({'≤' if ok else '>'} tolerance {d['tol']:.3g}) on {d['n_tokens_checked']} tokens.",
        "pass" if ok else "fail"))
    keys = ("max_abs_logprob_diff", "tol", "passed", "n_tokens_checked", "normalization_type",
            "folded_normalization_type", "positional_embedding_type", "w_pos_norm_before", "w_pos_norm_after",
            "note")
    section.blocks.append(Table(["quantity", "value"], [[k, d.get(k)] for k in keys]))
    return section


def _folded_model(ctx: Context) -> tuple[Any, str]:
    if "fold" not in ctx.data:
        _run_fold(ctx)
    if ctx.folded is not None:
        return ctx.folded, ""
    return ctx.model, "The fold check failed, so these circuits use the unfolded weights (LayerNorm weights ignored)."


# --- attention -----------------------------------------------------------------------------------
MIN_QUERIES = 10  # a head score over fewer queries is shown with a caution, not as a finding


def attention(ctx: Context) -> Section:
    from toylens.analyze.attention import CONTENT_SCORES, SCORE_NAMES, attention_patterns, positional_shortcuts
    from toylens.report.circuitsvis_views import attention_views

    res = attention_patterns(ctx.model, ctx.batch, **ctx.kw)
    d = res.to_dict()
    prev = res.scores["previous_token"].reshape(-1)
    best = int(torch.nan_to_num(prev, nan=-1.0).argmax())
    d["previous_token_head"] = {"head": res.head_labels[best], "score": float(prev[best])}
    shortcuts = positional_shortcuts(ctx.model, ctx.batch, res, **ctx.kw)
    d["positional_shortcuts"] = shortcuts
    ctx.data["attention"] = jsonable(d)
    rows, notes = [], []
    for label in res.head_labels:
        sc = d["scores_by_head"][label]
        s = shortcuts.get(label)
        where = (f"−{s['offset']}: {s['share']:.2f} ({s['share_shuffled']:.2f} shuffled)" if s else "")
        rows.append([label] + [sc[n] for n in SCORE_NAMES] + [where])
        for n in CONTENT_SCORES:
            if s and s["offset"] >= 2 and (sc[n] or 0) >= 0.3:
                notes.append(Note(
                    f"Positional shortcut: {label}'s {n} score {sc[n]:.3f} comes from position, not token content. "
                    f"{s['share']:.2f} of its attention goes {s['offset']} tokens back, and still "
                    f"{s['share_shuffled']:.2f} when the tokens of each row are shuffled (no repeats left): the "
                    f"task's layout puts the key at a fixed offset.", "warn"))
    n_heads = ctx.model.cfg.n_heads
    figs = [f for f in _pick(res.figures(), "attention/", height=460)
            if "_mean" not in f.name or n_heads > 1]
    counts = ", ".join(f"{k} {v}" for k, v in res.score_counts.items())
    few = [n for n, c in res.score_counts.items() if c < MIN_QUERIES]
    if few:
        notes.append(Note(f"Caution: {', '.join(f'{n} ({res.score_counts[n]} queries)' for n in few)} rest on fewer "
                          f"than {MIN_QUERIES} queries per layer: too few to call a head by them.", "warn"))
    tops = []
    for n in [n for n in SCORE_NAMES if n not in few]:
        v = torch.nan_to_num(res.scores[n].reshape(-1), nan=-1.0)
        if float(v.max()) >= 0:
            tops.append(f"{n} {res.head_labels[int(v.argmax())]} ({float(v.max()):.3f})")
    return Section("attention", "Attention patterns and head scores", (
        "Each heatmap is one head's attention pattern averaged over the evaluation batch: row = the "
        "query position doing the looking, column = the key position it looks at (each row sums to 1). "
        "A previous-token head is bright just below the diagonal; its previous_token score (the average "
        "attention from each position to the one before it) is then close to 1. 'fixed offset' lists heads "
        "that put at least half their attention (on the scored positions) at one distance back, with the tokens "
        "as they are and with each row's tokens shuffled: such a head attends by position."), [
        Note(f"Highest head per score: {'; '.join(tops)}. Head most like a previous-token head: "
             f"{d['previous_token_head']['head']} (previous_token score {d['previous_token_head']['score']:.3f}).",
             "info"),
        *notes,
        Table(["head", *SCORE_NAMES, "fixed offset"], rows, sortable=True, highlight={best},
              caption=f"Head-type scores (0 to 1; — where undefined); queries counted per layer: {counts}"),
        *figs, *attention_views(ctx)])


# --- circuits ------------------------------------------------------------------------------------
def circuits(ctx: Context) -> Section:
    from toylens.analyze.qkov import circuits as circuits_fn

    model, note = _folded_model(ctx)
    d_vocab = model.cfg.d_vocab
    names = list(ctx.run.task.token_names)
    names += [str(i) for i in range(len(names), d_vocab)]
    n_tok = min(d_vocab, ctx.cfg.max_tokens)
    with warnings.catch_warnings():
        if note:  # the note on the page says the weights are unfolded; no need to warn as well
            warnings.simplefilter("ignore", UserWarning)
        res = circuits_fn(model, token_names=names, token_subset=list(range(n_tok)))
    d = res.to_dict()
    d.update(shown_token_ids=res.token_ids, shown_token_names=names[:n_tok], d_vocab=d_vocab,
             qk_token=res.qk_token, ov_logit=res.ov_logit, qk_pos=res.qk_pos,
             ov_mlp={f"L{h}->blocks.{m}.mlp": t for (h, m), t in res.ov_mlp.items()})
    ctx.data["circuits"] = jsonable(d)
    shown = (f"The token heatmaps show the first {n_tok} of {d_vocab} tokens, to stay readable; the scores "
             f"use the whole vocabulary." if n_tok < d_vocab else f"All {d_vocab} tokens are shown.")
    heads = [[label, s["copying_score"], s["self_top1_fraction"]] for label, s in d["scores_by_head"].items()]
    comp = []
    n_heads = model.cfg.n_heads
    for i, a in enumerate(res.head_labels):
        for j, b in enumerate(res.head_labels):
            if j // n_heads > i // n_heads:
                comp.append([a, b] + [float(res.composition[m].reshape(len(heads), len(heads))[i, j])
                                      for m in ("Q", "K", "V")])
    figs = res.figures()
    blocks: list = [Note(shown + (" " + note if note else ""), "warn" if note else "info"),
                    Table(["head", "copying_score", "self_top1_fraction"], heads, sortable=True,
                          caption="OV copying scores (+1: the head copies the token it attends to)")]
    if comp:
        blocks.append(Table(["earlier head", "later head", "Q", "K", "V"], comp, sortable=True,
                            caption="Composition scores: how much the later head reads what the earlier wrote"))
    for prefix in ("circuits/qk_token/", "circuits/qk_pos/", "circuits/ov_logit/"):
        blocks += _pick(figs, prefix, height=480)
    blocks += [Figure(f.name, f.fig, wide=True) for f in _pick(figs, "circuits/ov_mlp/", height=460)]
    blocks += _pick(figs, "circuits/copying_score") + _pick(figs, "circuits/self_top1_fraction")
    blocks += _pick(figs, "circuits/composition_", height=380)
    return Section("circuits", "QK and OV circuits", (
        "Read from the folded weights alone. QK: how strongly a query token wants to attend to a key token "
        "(W_E W_Q W_K^T W_E^T). OV: what attending to a source token does to each output logit "
        "(W_E W_V W_O W_U) or to each MLP neuron (W_E W_V W_O W_in). A bright diagonal in the OV logit circuit "
        "means the head copies tokens."), blocks)


# --- direct logit attribution, logit lens --------------------------------------------------------
def dla(ctx: Context) -> Section:
    from toylens.analyze.attribution import direct_logit_attribution

    res = direct_logit_attribution(ctx.model, ctx.batch, relative_to_mean=True, **ctx.kw)
    d = res.to_dict()
    ctx.data["dla"] = jsonable(d)
    rows = [[label, d["mean"][i]] for i, label in enumerate(res.labels)]
    return Section("dla", "Direct logit attribution", (
        "How much each component (embedding, each head, each MLP) writes directly towards the correct "
        "answer's logit (minus the mean logit), through the final LayerNorm with its scale frozen. Large "
        "positive bars are the components that push the right answer up; the per-position plot shows where."), [
        Note(f"Components sum to the target logit: {sum(d['mean']):.4g} + bias {d['logit_bias_mean']:.4g} = "
             f"{d['target_logit_mean']:.4g}, over {d['n_positions']} positions.", "info"),
        Table(["component", "mean DLA"], rows, sortable=True),
        *_pick(res.figures(), "dla/")])


def logit_lens(ctx: Context) -> Section:
    from toylens.analyze.attribution import logit_lens as logit_lens_fn

    res = logit_lens_fn(ctx.model, ctx.batch, **ctx.kw)
    d = res.to_dict()
    ctx.data["logit_lens"] = jsonable(d)
    rows = [[label, d["loss"][i], d["accuracy"][i]] for i, label in enumerate(res.labels)]
    return Section("logit_lens", "Logit lens", (
        "Decode the residual stream before each layer (and after the last) with the final LayerNorm and "
        "the unembedding, as if the model stopped there. The loss falls at the layer where the answer "
        "first becomes readable."), [
        Table(["stage", "loss", "accuracy"], rows), *_pick(res.figures(), "logit_lens/")])


# --- neurons -------------------------------------------------------------------------------------
def neurons(ctx: Context) -> Section:
    from toylens.analyze.neurons import neuron_activity

    res = neuron_activity(ctx.model, ctx.batch, **ctx.kw)
    d = res.to_dict()
    d["frequency"] = res.frequency
    ctx.data["neurons"] = jsonable(d)
    section = Section("neurons", "MLP neurons", (
        f"For each MLP neuron and position, the fraction of sequences in which the neuron fires "
        f"(hook_post > {res.threshold:g}). Dead neurons never fire on the batch; they do nothing and could be "
        f"removed."))
    if not res.layers:
        section.blocks.append(Note("This model has no MLPs (attn_only).", "info"))
        return section
    rows = []
    for i, layer in enumerate(res.layers):
        ids = d["dead_neurons"][f"blocks.{layer}.mlp"]
        shown = ", ".join(map(str, ids[:30])) + (f" … ({len(ids) - 30} more)" if len(ids) > 30 else "")
        rows.append([f"blocks.{layer}.mlp", d["n_dead"][i], d["frequency_mean"][i], shown or "none"])
    section.blocks.append(Table(["layer", "dead neurons", "mean firing frequency", "dead neuron ids"], rows))
    figs = res.figures()
    section.blocks += [Figure(f.name, f.fig, wide=True)
                       for f in _pick(figs, "neurons/layer", height=420) if f.name.endswith("_frequency")]
    section.blocks += _pick(figs, "neurons/dead", height=340)
    return section


# --- ablation ------------------------------------------------------------------------------------
def ablation(ctx: Context) -> Section:
    from toylens.analyze.ablation import ablate_every_hook

    a = ctx.cfg.ablation
    res = ablate_every_hook(ctx.model, ctx.batch, reference=ctx.reference, modes=list(a.modes),
                            per_head=a.per_head, chunk_rows=a.chunk_rows, progress=ctx.cfg.progress,
                            generator=torch.Generator().manual_seed(ctx.cfg.reference.seed))
    ctx.ablation = res
    d = res.to_dict()
    ctx.data["ablation"] = jsonable(d)
    rows = d["rows"]
    several = len(res.modes) > 1
    top = rows[: a.top_k]
    labels = [f"{r['hook']} ({r['mode']})" if several else r["hook"] for r in top]
    bottom = 50 + int(5.2 * max((len(x) for x in labels + res.hooks), default=10))  # rotated hook names
    fig = go.Figure(go.Bar(x=labels, y=[r["delta_loss"] for r in top],
                           customdata=[[r["loss"], r["accuracy"]] for r in top],
                           hovertemplate="%{x}<br>Δ loss %{y:.4g}<br>loss %{customdata[0]:.4g}"
                                         "<br>accuracy %{customdata[1]:.3f}<extra></extra>"))
    fig.update_layout(title=f"The {len(top)} most damaging ablations (clean loss {res.clean_loss:.4g})",
                      xaxis_title="hook", yaxis_title="Δ loss")
    fig.update_xaxes(type="category", tickangle=-45)
    table = Table(["rank", "hook", "mode", "loss", "Δ loss", "accuracy"],
                  [[i + 1, r["hook"], r["mode"], r["loss"], r["delta_loss"], r["accuracy"]]
                   for i, r in enumerate(rows)], sortable=True,
                  caption="Every ablation; click a column header to sort")
    blocks: list = [
        Note(f"Clean loss {res.clean_loss:.4g}, accuracy {res.clean_accuracy:.4f} on {res.n_rows} rows; "
             f"replacements from a separate reference batch of {res.n_reference_rows} rows. Most damaging: "
             + "; ".join(f"{r['hook']} ({r['mode']}) Δ {_num(r['delta_loss'])}" for r in rows[:3]) + ".", "info"),
        Figure("ablation/ranked", _style(fig, height=500, bottom=bottom), wide=True), table]
    blocks += [Figure(f.name, f.fig, wide=True)
               for f in _pick(res.figures(), "ablation/", height=500, bottom=bottom)]
    if d["skipped"]:
        blocks.append(Table(["hook", "why not ablated"], [[s["hook"], s["reason"]] for s in d["skipped"]]))
    for f in blocks:
        if isinstance(f, Figure):
            # Fixed bottom margin for the rotated hook names: plotly's automargin can loop here
            # ("Too many auto-margin redraws") when the page width changes.
            f.fig.update_xaxes(tickangle=-45, automargin=False)
            xs = f.fig.data[0].x if f.fig.data and getattr(f.fig.data[0], "x", None) is not None else []
            first = max((len(str(x)) for x in list(xs)[:5]), default=0)
            # a name rotated 45 degrees reaches left of its tick by ~0.71 x its width (~7 px a character);
            # on a narrow page the first few ticks are a few px apart, so each of them must fit
            f.fig.update_layout(margin_l=max(60, int(0.71 * 7 * first) + 16))
    return Section("ablation", "Ablating every hook", (
        "Each activation in turn is replaced by its average over a separate reference batch (mean "
        "ablation; zero and resample are other choices) and the loss is measured again. The bigger the rise "
        "in loss (Δ loss), the more the model needs the information that activation carries."), blocks)


def _num(v) -> str:
    return "NaN" if v is None else f"{v:.4g}"
