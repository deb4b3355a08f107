"""The report's canon sections: ``induction`` (Elhage et al. 2021, Olsson et al. 2022) for runs whose task
repeats random segments and ``fourier`` (Nanda et al. 2023) for modular_add runs; with over=checkpoints,
their findings against the step (``canon_dynamics_blocks``). A run whose task does not fit gets the reason."""

from __future__ import annotations

import math
import sys

from toylens.report.page import Figure, Note, Section, Table
from toylens.result import jsonable

INDUCTION_INTRO = (
    "Induction heads (Elhage et al. 2021; Olsson et al. 2022) on sequences [BOS, x, x] whose second half repeats a "
    "random first half, so only the repeat makes it predictable. A previous-token head in layer 0 writes "
    "\"the token before me was t\" into each position; a layer-1 induction head's keys read that (K-composition) "
    "and its query looks for the current token, so it attends to the token after the earlier copy and, if its OV "
    "circuit copies, predicts it. Scores: previous_token (attention to the position before), induction (attention "
    "from the repeat to the token after the first copy), prefix_matching (attention to any token after an earlier "
    "copy of the query's token), copying (positive share of the OV circuit's eigenvalues, 1 = copies).")
FOURIER_INTRO = (
    "A network that groks modular addition (Nanda et al. 2023) embeds each number as waves cos(wk·a), sin(wk·a) "
    "for a few key frequencies k, computes cos(wk(a+b)) in its MLP and reads the answer c from cos(wk(a+b−c)). "
    "Restricted loss keeps only those key-frequency terms of the logits (low: the algorithm alone gives the "
    "answer); excluded loss removes them (high on the train pairs: the model no longer relies on memorising).")


def left_out(name: str, ctx) -> str | None:
    """Why canon section ``name`` does not fit ``ctx``'s run (one line), or None when it does."""
    from toylens.analyze.induction import repeat_spec

    task = None if ctx.run is None else ctx.run.task
    if task is None:
        return f"{name} needs a toylens run of its task; this is a pretrained model"
    if name == "induction":
        return repeat_spec(task)[1] or None
    if name == "fourier" and task.name != "modular_add":
        return f"task {task.name!r} is not modular_add (train one with experiment=grokking)"
    return None


def _skip(ctx, sid: str, title: str, intro: str, why: str) -> Section:
    ctx.data[sid] = {"skipped": why}
    return Section(sid, title, intro, [Note(f"Not applicable to this run: {why}.", "info")])


def _style(fig, height: int = 420):
    fig.update_layout(height=height, margin=dict(l=60, r=20, t=56, b=50), title_font_size=14, title_x=0.02)
    return fig


def induction(ctx) -> Section:
    from toylens.analyze.induction import INDUCTION_SCORES, induction_circuit, repeat_spec
    from toylens.report.sections import _folded_model

    nan = float("nan")
    title = "Induction heads"
    why = left_out("induction", ctx)
    if why:
        return _skip(ctx, "induction", title, INDUCTION_INTRO, why)
    spec, _ = repeat_spec(ctx.run.task, ctx.model.cfg.n_ctx)
    folded, fold_note = _folded_model(ctx)
    task_batch = ctx.run.batch(ctx.cfg.batch.size, ctx.cfg.batch.seed, device=ctx.device)
    res = induction_circuit(ctx.model, spec, n_rows=ctx.cfg.batch.size, seed=ctx.cfg.batch.seed, folded=folded,
                            chunk_size=ctx.cfg.chunk_size, progress=ctx.cfg.progress, task_batch=task_batch)
    d = jsonable(res.to_dict())
    d["sequences"] = {"half_len": spec.half_len, "task_half_len": getattr(ctx.run.task.cfg, "half_len", None),
                      "bos": spec.bos, "symbols": [spec.low, spec.high - 1], "rows": res.n_rows}
    ctx.data["induction"] = d
    c = res.circuit
    blocks: list = []
    if c.get("found"):
        prev_names = {h["head"] for h in c["previous_token_heads"]}
        kind = "pass" if c["induction_score"] >= 0.5 and c["partner_head"] in prev_names else "warn"
        blocks.append(Note(f"Circuit: {c['line']}.", kind))
        blocks.append(Note(_carriers_text(c, res.task_carriers), "info"))
        if c["partner_head"] not in prev_names:
            blocks.append(Note(f"The head composing most with {c['induction_head']} ({c['partner_head']}) is not "
                               f"among the previous-token heads ({', '.join(sorted(prev_names))}).", "warn"))
        patch = _composition_patching(ctx, c)
        if patch is not None:
            d["composition_patching"] = patch
            blocks.append(_patching_note(patch))
    else:
        blocks.append(Note(c["line"], "warn"))
    if fold_note:
        blocks.append(Note(fold_note, "warn"))
    if res.first_half_loss > math.log(spec.high - spec.low) + 0.5:
        blocks.append(Note(f"The first half's loss ({res.first_half_loss:.2f}) is above a uniform guess "
                           f"({math.log(spec.high - spec.low):.2f}): the task's loss mask covers the repeat only, so "
                           f"the model was never trained there and the ICL score overstates in-context learning; "
                           f"compare the repeated-half loss with the uniform guess.", "info"))
    if spec.half_len != d["sequences"]["task_half_len"]:
        blocks.append(Note(f"Segments of {spec.half_len} tokens, not the task's {d['sequences']['task_half_len']}: "
                           f"with the task's fixed layout a head could find the induction key by position alone.",
                           "info"))
    blocks.append(Table(["quantity", "value"], [
        [f"in-context-learning score (loss at position {res.icl_late_pos} minus at {res.icl_early_pos})",
         f"{res.icl_score:+.4f}"],
        ["loss on the repeated half", f"{res.repeated_half_loss:.4f}"],
        ["loss on the first half (random)", f"{res.first_half_loss:.4f}"],
        ["a uniform guess over the symbols, log(n)", f"{math.log(spec.high - spec.low):.4f}"],
        ["K-composition of the pair / mean over all earlier→later pairs",
         f"{c.get('k_composition', nan):.3f} / {c.get('mean_k_composition_into_later_layers', nan):.3f}"],
    ], caption=f"On {res.n_rows} sequences [BOS, x, x] with x of {spec.half_len} random symbols"))
    heads = d["scores_by_head"]
    names = [*INDUCTION_SCORES, "copying", "copying_signed"]
    named = {c.get("induction_head"), c.get("partner_head"), *(h["head"] for h in c.get("previous_token_heads", [])),
             *(h["head"] for h in c.get("induction_heads", []))}
    hl = {i for i, h in enumerate(res.head_labels) if h in named}
    task_heads = d.get("task_scores_by_head") or {}
    tnames = [f"{n} (task batch)" for n in ("previous_token", "induction")] if task_heads else []
    blocks.append(Table(["head", *names, *tnames],
                        [[h, *(heads[h][n] for n in names),
                          *((task_heads[h]["previous_token"], task_heads[h]["induction"]) if task_heads else ())]
                         for h in res.head_labels], sortable=True, highlight=hl,
                        caption="Per head, on repeated random sequences and (task batch) on the task's own batch: "
                                "previous_token over every query, induction over the queries the loss is scored at "
                                "(copying_signed: sum(λ)/sum(|λ|), as in the circuits section)"))
    n_layers, n_heads = res.copying.shape
    if n_layers >= 2:
        k = res.composition
        blocks.append(Table(["layer-0 head", "layer-1 head", "K", "Q", "V"],
                            [[f"L0H{a}", f"L1H{b}", *(float(k[m][0, a, 1, b]) for m in ("K", "Q", "V"))]
                             for a in range(n_heads) for b in range(n_heads)], sortable=True,
                            caption="Composition scores ||W_QK^T W_OV|| / (||W_QK|| ||W_OV||) (K; Q and V "
                                    "analogous), Frobenius norms, folded weights"))
    for name, fig in res.figures().items():
        blocks.append(Figure(name, _style(fig), wide=name.endswith("loss_by_pos")))
    return Section("induction", title, INDUCTION_INTRO, blocks)


def _carriers_text(c: dict, task_carriers: dict) -> str:
    def heads(hs):
        return ", ".join(f"{h['head']} {h['score']:.2f}" + (" (weak)" if h.get("weak") else "") for h in hs) or "none"

    out = (f"Rule: {c['rule']}. On repeated random sequences: previous-token "
           f"{'split over ' if c['previous_token_split'] else ''}{heads(c['previous_token_heads'])}; induction "
           f"{'split over ' if c['induction_split'] else ''}{heads(c['induction_heads'])}.")
    if task_carriers:
        out += (f" On the task's batch: previous-token {heads(task_carriers['previous_token'])}; induction "
                f"{heads(task_carriers['induction'])}.")
    return out


def _composition_patching(ctx, c: dict) -> dict | None:
    """Exact edge patching of the previous-token → induction edges into keys, queries and values (None when the
    model is not on the fused engine or the task has no corruption)."""
    from toylens.analyze.discovery import DiscoveryError
    from toylens.analyze.induction import composition_patching, induction_pairs

    try:
        pairs = induction_pairs(ctx.run.task, min(ctx.cfg.batch.size, 256), ctx.cfg.batch.seed)
        return composition_patching(ctx.model, pairs.to(ctx.device), c)
    except (DiscoveryError, NotImplementedError, AttributeError) as e:
        return {"skipped": str(e)}


def _patching_note(p: dict) -> Note:
    if "skipped" in p:
        return Note(f"Composition patching skipped: {p['skipped']}.", "info")
    parts = ", ".join(f"{m} edges ({p[m]['edges']}) keep {p[m]['recovered']:.0%}" for m in ("K", "Q", "V")
                      if p[m]["edges"])
    head = (f"The model relies on {p['relies_on']}-composition" if p["relies_on"]
            else "No composition is needed (corrupting each kind keeps ≥ 90%)")
    return Note(f"{head}: exact edge patching on {p['n_prompts']} task prompts (first copy resampled), with the "
                f"edges from the previous-token heads into the induction heads' inputs corrupted, of the logit "
                f"difference clean minus all-corrupted ({p['clean_logit_diff']:.2f} vs "
                f"{p['corrupted_logit_diff']:.2f}): {parts}.", "pass" if p["relies_on"] else "info")


def fourier(ctx) -> Section:
    from toylens.analyze.fourier import CLUSTER_MIN, KEY_FACTOR, fourier_analysis

    title = "Grokking: modular addition in the Fourier basis"
    why = left_out("fourier", ctx)
    if why:
        return _skip(ctx, "fourier", title, FOURIER_INTRO, why)
    task = ctx.run.task
    res = fourier_analysis(ctx.model, task)
    d = jsonable(res.to_dict())
    ctx.data["fourier"] = d
    blocks: list = []
    if res.key_freqs:
        blocks.append(Note(f"Key frequencies k = {res.key_freqs}: {res.key_share:.1%} of the embedding's "
                           f"squared norm (constant left out) lies in them.",
                           "pass" if res.key_share > 0.5 else "info"))
    else:
        blocks.append(Note(f"No key frequency: no frequency holds {KEY_FACTOR:g}x the average share of the "
                           f"embedding's norm; the model has not (yet) found the Fourier algorithm, so restricted "
                           f"and excluded loss equal 'keep only the mean' and the plain loss.", "warn"))
    L = res.losses
    blocks.append(Table(["", "train pairs", "test pairs"], [
        ["loss", L["loss"]["train"], L["loss"]["test"]],
        ["restricted loss (key frequencies only)", L["restricted"]["train"], L["restricted"]["test"]],
        ["excluded loss (key frequencies removed)", L["excluded"]["train"], L["excluded"]["test"]],
        ["accuracy", res.accuracy["train"], res.accuracy["test"]],
    ], caption=f"All {res.p}² pairs, split as the run trained (task.frac_train="
               f"{getattr(task.cfg, 'frac_train', None)}, task.split_seed={getattr(task.cfg, 'split_seed', None)}); "
               f"sum of squared weights "
               f"{res.sum_sq_weights:.4g}"))
    if res.clusters:
        mean = d.get("neuron_best_key_frac_mean")
        blocks.append(Table(["cluster (best key frequency)", "neurons"], [[k, v] for k, v in res.clusters.items()],
                            caption=f"MLP {res.neuron_layer} neurons whose best key frequency explains ≥ "
                                    f"{CLUSTER_MIN:.0%} of their variance over all pairs; mean explained "
                                    f"{mean:.1%}"))
    elif res.neuron_frac is None:
        blocks.append(Note("The model is attention-only: no MLP neurons to cluster.", "info"))
    for name, fig in res.figures().items():
        blocks.append(Figure(name, _style(fig, 520 if name == "fourier/logits" else 420),
                             wide=name in ("fourier/logits", "fourier/neurons")))
    return Section("fourier", title, FOURIER_INTRO, blocks)


def canon_dynamics_blocks(ctx) -> list:
    """Figures and tables of the canon finding that fits the run, for the training-dynamics section;
    stored in ``ctx.data["dynamics_canon"]``. Empty when neither fits or neither is asked for."""
    from toylens.analyze.canon_dynamics import grokking_dynamics, induction_dynamics
    from toylens.analyze.induction import repeat_spec

    if ctx.run is None:
        return []
    task, cfg = ctx.run.task, ctx.cfg
    steps = cfg.dynamics.steps or None
    blocks: list = []
    if "induction" in cfg.analyses and repeat_spec(task)[0] is not None:
        _say(ctx, "induction over checkpoints ...")
        res = induction_dynamics(ctx.run, steps, n_rows=min(cfg.batch.size, 500), device=ctx.device,
                                 chunk_size=cfg.chunk_size, progress=cfg.progress)
        d = jsonable(res.to_dict())
        ctx.data["dynamics_canon"] = {"induction": d}
        pc = res.phase_change
        blocks.append("Induction heads over training")
        blocks.append(Note(
            f"Phase change: the best layer-1 induction score rises fastest between steps {pc['from_step']} and "
            f"{pc['to_step']} (+{pc['rise']:.3f}); at the last checkpoint {res.circuit.get('line', '')}."
            if pc else "No induction score rises over these checkpoints: no phase change.", "pass" if pc else "warn"))
        best = d["best_induction_score"]
        blocks.append(Table(["step", "best induction score", "ICL score", "repeated-half loss", "first-half loss",
                             "K-composition of the pair"],
                            [[s, best[i], *(float(t[i]) for t in (res.icl_score, res.repeated_half_loss,
                                                                    res.first_half_loss, res.k_composition))]
                             for i, s in enumerate(res.steps)], sortable=True))
        blocks += [Figure(n, _style(f)) for n, f in res.figures().items()]
    if "fourier" in cfg.analyses and task.name == "modular_add":
        _say(ctx, "fourier over checkpoints ...")
        res = grokking_dynamics(ctx.run, steps, device="cpu", progress=cfg.progress)
        d = jsonable(res.to_dict())
        ctx.data["dynamics_canon"] = {"grokking": d}
        ph = res.phases
        blocks.append("Grokking over training")
        spans = [f"{n.replace('_', ' ')} {ph[n][0]}–{ph[n][1]}" for n in ("memorisation", "circuit_formation",
                                                                         "cleanup") if ph.get(n)]
        blocks.append(Note("Phases located from the curves: " + ("; ".join(spans) or "none") +
                           (f". {ph['note']}" if ph.get("note") else "."), "pass" if ph.get("cleanup") else "warn"))
        rows = []
        for name in ("memorisation", "circuit_formation", "cleanup"):
            if ph.get(name):
                for s in ph[name]:
                    i = res.steps.index(s)
                    rows.append([f"{name} {'start' if s == ph[name][0] else 'end'}", s,
                                 *(float(res.losses[k][i]) for k in ("loss/train", "loss/test", "restricted/test",
                                                                     "excluded/train")),
                                 float(res.sum_sq_weights[i]), float(res.key_share[i])])
        blocks.append(Table(["boundary", "step", "train loss", "test loss", "restricted loss (test)",
                             "excluded loss (train)", "Σ w²", "key-frequency share"], rows,
                            caption="Rules: memorisation ends at train accuracy ≥ 0.99; clean-up runs from 10% to "
                                    "90% of the fall of log test loss after its peak"))
        blocks += [Figure(n, _style(f)) for n, f in res.figures().items()]
    return blocks


def _say(ctx, msg: str) -> None:
    if ctx.cfg.progress:
        print(f"toylens-analyze: {msg}", file=sys.stderr, flush=True)
