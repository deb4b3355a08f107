"""The report's intervention sections: activation (and attribution) patching, causal tracing and
task vectors. Like ``report_sections``, each builder runs its analysis, stores every number it
shows in ``ctx.data[<section>]`` (report.json) and returns a ``Section``.

Clean/corrupted pairs come from ``cfg.pairs``: prompt strings when given (tokenized by the model's
tokenizer: toy runs have one attached, pretrained models keep theirs), else ``pairs.n`` pairs from
the run's task ``corrupt()``.
"""

from __future__ import annotations

import torch

from toylens.report.page import Figure, Note, Section, Table
from toylens.result import jsonable

MIN_CELLS = 10  # a correlation over fewer cells is shown with a caution, not as a finding


def applicable_kinds(model, kinds: list[str]) -> tuple[list[str], list[str]]:
    """(the patching kinds this model has, one line per kind left out or changed). An attention-only
    model has no mlp_out or resid_mid; its block_every is patched as resid_pre and attn_out."""
    if not model.cfg.attn_only:
        return list(kinds), []
    out, dropped = [], []
    for k in kinds:
        if k in ("mlp_out", "resid_mid"):
            dropped.append(f"{k} (the model is attention-only: it has no MLP)")
        elif k == "block_every":
            out += [p for p in ("resid_pre", "attn_out") if p not in out]
            dropped.append("block_every's mlp_out (attention-only model); its resid_pre and attn_out are patched")
        elif k not in out:
            out.append(k)
    return out, dropped


def _style(fig, height: int = 380):
    fig.update_layout(height=height, margin=dict(l=60, r=20, t=56, b=50), title_font_size=14, title_x=0.02)
    return fig


def pairs_for(ctx):
    """The clean/corrupted pairs of this report (cached on the context), or a string saying why there are none."""
    if "pairs" in ctx.cache:
        return ctx.cache["pairs"]
    from toylens.analyze.prompts import pairs_from_prompts, pairs_from_task

    p = ctx.cfg.pairs
    if p.clean:
        pairs = pairs_from_prompts(ctx.model, p.clean, p.corrupted, p.answers, p.wrong_answers or None)
    elif ctx.run is None:
        pairs = "no prompts: give pairs.clean, pairs.corrupted, pairs.answers and pairs.wrong_answers"
    elif _no_corrupt(ctx.run.task):
        pairs = (f"{_no_corrupt(ctx.run.task)}; instead, give prompt pairs: pairs.clean=[...] "
                 f"pairs.corrupted=[...] pairs.answers=[...] pairs.wrong_answers=[...]")
    else:
        pairs = pairs_from_task(ctx.run.task, p.n, p.seed, device=ctx.device)
    ctx.cache["pairs"] = pairs
    return pairs


def _no_corrupt(task) -> str | None:
    """Why the task offers no clean/corrupted pairs (None when it does)."""
    from toylens.data.contract import corrupt_reason

    return corrupt_reason(task)


def _skipped(ctx, section: Section, why: str, kind: str = "warn") -> Section:
    """The section says why it did not run, and report.json records it under the section's id."""
    section.blocks.append(Note(f"Skipped: {why}.", kind))
    ctx.data[section.id] = {"skipped": why}
    return section


def _pairs_table(pairs) -> Table:
    return Table(["", "value"], [["pairs", pairs.batch_size], ["positions", pairs.n_pos],
                                 ["answer positions", sorted(set(pairs.answer_pos.tolist()))],
                                 ["answer tokens", pairs.answers.shape[2]]])


# --- activation patching ---------------------------------------------------------------------------
def patching(ctx) -> Section:
    from toylens.analyze.attribution_patching import attribution_patch, correlation
    from toylens.analyze.patching import patch, patching_context

    cfg = ctx.cfg.patching
    section = Section("patching", "Activation patching", (
        "Each cell runs the corrupted prompts with one activation taken from the clean run and measures how much "
        f"of the clean {cfg.metric} comes back (0 = corrupted, 1 = clean). Bright cells carry the information that "
        "distinguishes the clean answer. Attribution patching is the first-order (gradient) estimate of the same "
        "numbers from one forward and one backward pass; its correlation with the exact values says how far "
        "the linear picture can be trusted."))
    pairs = pairs_for(ctx)
    if isinstance(pairs, str):
        return _skipped(ctx, section, pairs)
    section.blocks.append(_pairs_table(pairs))
    context = patching_context(ctx.model, pairs, cfg.metric)
    kinds, dropped = applicable_kinds(ctx.model, cfg.kinds)
    if dropped:
        section.blocks.append(Note("Left out: " + "; ".join(dropped) + ".", "info"))
    results = {k: patch(ctx.model, pairs, k, cfg.metric, progress=ctx.cfg.progress, context=context) for k in kinds}
    data = {"metric": cfg.metric, "n_pairs": pairs.batch_size, "sweeps": {k: jsonable(r.to_dict())
                                                                          for k, r in results.items()}}
    first = next(iter(results.values()), None)
    if first is not None:
        data["clean_value"], data["corrupted_value"] = first.clean_value, first.corrupted_value
        section.blocks.append(Note(f"{cfg.metric}: clean {first.clean_value:.4g}, corrupted "
                                   f"{first.corrupted_value:.4g} (mean over {pairs.batch_size} pairs).", "info"))
    for r in results.values():
        section.blocks += [Figure(n, _style(f)) for n, f in r.figures().items()]
    if cfg.attribution and results:
        attr = attribution_patch(ctx.model, pairs, kinds, cfg.metric)
        rows, corr = [], {}
        for kind, exact in results.items():
            est = attr.results.get(kind)
            if est is None:
                continue
            types = exact.labels["patch_type"] if exact.dims[0] == "patch_type" else [None]
            for t in types:
                e, x = (est, exact) if t is None else (est.sub(t), exact.sub(t))
                corr[e.kind] = correlation(e, x)
                n_cells = x.values.numel()
                caution = f"only {n_cells} cells: too few to judge" if n_cells < MIN_CELLS else ""
                rows.append([e.kind, corr[e.kind], n_cells, caution])
        data["attribution_correlation"] = corr
        data["attribution_cells"] = {r[0]: r[2] for r in rows}
        section.blocks.append(Table(["sweep", "correlation: attribution vs exact patching", "cells", "caution"],
                                    rows, caption=f"Pearson correlation over all cells of each sweep (a correlation "
                                                  f"over fewer than {MIN_CELLS} cells is not a finding)"))
    ctx.data["patching"] = jsonable(data)  # a constant sweep has a NaN correlation: null in report.json
    return section


# --- causal tracing --------------------------------------------------------------------------------
def tracing(ctx) -> Section:
    from toylens.analyze.tracing import causal_trace

    cfg = ctx.cfg.tracing
    section = Section("tracing", "Causal tracing", (
        "ROME's causal trace: Gaussian noise (σ = 3 × the std of the embeddings unless set) is added to the "
        "embeddings of the noised positions (marked *), which destroys the answer; then one clean state at a time "
        "(the residual stream, an attention output or an MLP output at one layer and position) is restored. "
        "Cells that bring the answer's probability back hold the information the answer needs."))
    pairs = pairs_for(ctx)
    if isinstance(pairs, str):
        return _skipped(ctx, section, pairs)
    n = min(cfg.prompts, pairs.batch_size)
    tokens, answer_pos = pairs.clean[:n], pairs.answer_pos[:n]
    noise, how, every = trace_noise(pairs, n, list(cfg.noise))
    kinds = [k for k in cfg.kinds if not (ctx.model.cfg.attn_only and k == "mlp")]
    res = causal_trace(ctx.model, tokens, answer_pos, pairs.answers[:n, 0, 0], noise, kinds=kinds,
                       window=cfg.window, n_samples=cfg.n_samples, sigma=cfg.sigma, seed=cfg.seed,
                       metric=cfg.metric, pos_labels=pairs.labels(), progress=ctx.cfg.progress)
    ctx.data["tracing"] = jsonable(res.to_dict())
    ctx.data["tracing"].update(noised_positions=how, every_position_noised=every)
    rows = [[k, p["hook"], p["pos"], p["value"]] for k, p in res.peaks().items()]
    section.blocks.append(Note(f"{res.metric} of the answer: clean {res.clean:.4g}, noised {res.noised:.4g} "
                               f"({n} prompts × {res.n_samples} noise samples, σ = {res.sigma:.3g}); noised: {how}.",
                               "info"))
    if every:
        section.blocks.append(Note(
            "Caution: every position before the answer is noised, so restoring the residual stream at the last "
            "position restores everything the answer depends on; that cell is ~clean by construction and the "
            "trace cannot single out where the information sits. Give tracing.noise=[...] (or prompt pairs that "
            "differ in a few positions) for a trace that can.", "warn"))
    if n < 3:
        section.blocks.append(Note(f"Caution: a trace over {n} prompt(s) only.", "warn"))
    section.blocks.append(Table(["kind", "best restore", "position", res.metric], rows))
    section.blocks += [Figure(name, _style(fig, 420)) for name, fig in res.figures().items()]
    return section


def trace_noise(pairs, n: int, noise: list[int]) -> tuple[object, str, bool]:
    """(the positions to noise for the first ``n`` pairs, a description, whether that is every position
    before the answer). Default: where the clean and corrupted prompts differ (before the answer), as ROME
    noises the subject; every position before the answer when they do not differ there."""
    tokens, answer_pos = pairs.clean[:n], pairs.answer_pos[:n]
    before = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < answer_pos[:, None]
    if noise:
        mask = torch.zeros_like(before)
        mask[:, noise] = True
        how = f"positions {noise} (tracing.noise)"
    else:
        mask = (tokens != pairs.corrupted[:n].to(tokens.device)) & before
        how = "the positions where the clean and corrupted prompts differ"
        if not bool(mask.any(-1).all()):
            mask, how = before, "every position before the answer (the prompts do not differ there)"
    every = bool((mask[before]).all())
    return (noise if noise else mask), how, every


# --- task vectors ----------------------------------------------------------------------------------
def task_vectors(ctx) -> Section:
    from toylens.analyze.task_vectors import SITES
    from toylens.analyze.task_vectors import task_vectors as compute

    section = Section("task_vectors", "Task vectors (in-context rules)", (
        "The residual stream of prompts with demonstrations, averaged over prompts, is the candidate task "
        "vector θ_k of rule k, taken at two sites: the final '->' (where the answer is predicted) and the last "
        "';' (the end of the demos, which cannot see the query). Written into the same site of zero-shot "
        "queries '[BOS, ;, x, ->]', it should make the model answer by rule k; swapping in the vector of another "
        "rule should make the answer follow the vector, not the demos."))
    task = None if ctx.run is None else ctx.run.task
    if task is None or task.name != "icl":
        return _skipped(ctx, section, "task vectors need a run of the icl task (e.g. toylens-train "
                                      "experiment=icl_task_vectors)", "info")
    results = {site: compute(ctx.model, task, site=site, n=ctx.cfg.task_vectors.n, seed=ctx.cfg.task_vectors.seed,
                             progress=ctx.cfg.progress) for site in SITES}
    d = {site: jsonable(res.to_dict()) for site, res in results.items()}
    best = max((r.best() for r in results.values()), key=lambda b: b["accuracy"])
    d["best"] = jsonable(best)
    ctx.data["task_vectors"] = d
    for site, res in results.items():
        b = res.best()
        kind = "pass" if b["accuracy"] > b["zero_shot_baseline"] + 0.1 else "warn"
        section.blocks.append(Note(
            f"At the {SITES[site]}, best point {b['hook']}: zero-shot accuracy with the task vector "
            f"{b['accuracy']:.3f}, against {b['zero_shot_baseline']:.3f} without demos and {b['demo_baseline']:.3f} "
            f"with {res.n_demos} demos; swapped vectors: {b['swap_follows_vector']:.3f} of answers follow the "
            f"vector's rule, {b['swap_follows_demos']:.3f} the demos'.", kind))
    for res in results.values():
        section.blocks += [Figure(name, _style(fig)) for name, fig in res.figures().items()]
    return section
