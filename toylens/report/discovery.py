"""The report's ``discovery`` section: edge scores by ``discovery.method``, the circuit drawn as a layered graph,
its faithfulness curve and a sortable edge table (``toylens.analyze.discovery``); report.json ``discovery``."""

from __future__ import annotations

from toylens.report.page import Figure, Note, Section, Table
from toylens.result import jsonable

INTRO = (
    "Circuit discovery scores every edge of the graph: a source (the embedding, a head's output z·W_O, an MLP's "
    "output) written into a later destination's input (a head's query, key or value, an MLP, the logits) through "
    "the residual stream. Exact patching corrupts one edge at a time; EAP estimates all of them from one forward "
    "and backward pass (Syed et al. 2023); EAP-IG integrates the gradients from the corrupted to the clean "
    "embeddings (Hanna et al. 2024); ACDC prunes edges whose removal changes the metric by less than a threshold "
    "(Conmy et al. 2023). Faithfulness: the metric recovered (0 = every edge corrupted, 1 = clean) by the best "
    "edges, computed by exact edge patching.")


def discovery(ctx) -> Section:
    from toylens.analyze.discovery import DiscoveryError, discover
    from toylens.report.interventions import pairs_for

    title = "Circuit discovery"
    dc = ctx.cfg.discovery
    pairs = pairs_for(ctx)
    if isinstance(pairs, str):
        ctx.data["discovery"] = {"skipped": pairs}
        return Section("discovery", title, INTRO, [Note(f"Left out: {pairs}.", "info")])
    try:
        res = discover(ctx.model, pairs, method=dc.method, metric=dc.metric, threshold=dc.threshold,
                       top_n=dc.top_n, target=dc.target if dc.threshold is None and dc.top_n is None else None,
                       ig_steps=dc.ig_steps, progress=ctx.cfg.progress)
    except DiscoveryError as e:
        ctx.data["discovery"] = {"skipped": str(e)}
        return Section("discovery", title, INTRO, [Note(f"Left out: {e}.", "info")])
    d = jsonable(res.to_dict())
    ctx.data["discovery"] = d
    ctx.cache["discovery"] = res
    circuit = res.circuit
    f = res.faithfulness
    blocks: list = [Note(f"{len(circuit)} of {res.settings['n_edges']} edges chosen ({_how(dc)}); they recover "
                         f"{f['circuit_recovered']:.3f} of the {res.metric} (clean {res.clean_value:.4g}, every edge "
                         f"corrupted {res.corrupted_value:.4g}) on {pairs.batch_size} prompt pairs.",
                         "pass" if f["circuit_recovered"] >= 0.8 else "warn")]
    if pairs.batch_size < 10:
        blocks.append(Note(f"Only {pairs.batch_size} prompt pairs: scores are noisy.", "warn"))
    blocks += [Figure("discovery/circuit", res.figures()["discovery/circuit"], wide=True),
               Figure("discovery/faithfulness", res.figures()["discovery/faithfulness"])]
    blocks.append(Table(["source", "destination", "score", "in circuit"],
                        [[e["src"], e["dst"], e["score"], "yes" if e["in_circuit"] else ""] for e in res.edges],
                        sortable=True, highlight={i for i, e in enumerate(res.edges) if e["in_circuit"]},
                        caption=f"Every edge, best first by |score| ({res.method}, metric {res.metric})"))
    return Section("discovery", title, INTRO, blocks)


def _how(dc) -> str:
    if dc.method == "acdc":
        return f"ACDC at threshold {dc.threshold:g}"
    if dc.threshold is not None:
        return f"{dc.method}, |score| > {dc.threshold:g}"
    if dc.top_n is not None:
        return f"{dc.method}, the top {dc.top_n}"
    return f"{dc.method}, the fewest best edges recovering {dc.target:g}"


def discovery_dynamics_blocks(ctx, steps) -> list:
    """Over checkpoints: the final circuit's edges (EAP) and faithfulness against the step."""
    from toylens.analyze.discovery import DiscoveryError, discover
    from toylens.analyze.discovery.over_steps import FORMED_AT, discovery_over_checkpoints
    from toylens.report.interventions import pairs_for

    pairs = pairs_for(ctx)
    if isinstance(pairs, str):
        return [Note(f"Circuit formation left out: {pairs}.", "info")]
    final = ctx.cache.get("discovery")
    dc = ctx.cfg.discovery
    try:
        if final is None:  # the discovery section did not run: the last checkpoint's circuit, same settings
            final = discover(ctx.model, pairs, method=dc.method, metric=dc.metric, threshold=dc.threshold,
                             top_n=dc.top_n, target=dc.target, ig_steps=dc.ig_steps)
        res = discovery_over_checkpoints(ctx.run, pairs, final, steps, device=ctx.device, progress=ctx.cfg.progress)
    except DiscoveryError as e:
        return [Note(f"Circuit formation left out: {e}.", "info")]
    ctx.data.setdefault("dynamics", {})["discovery"] = jsonable(res.to_dict())
    rows = [[edge, "—" if step is None else step] for edge, step in res.formed_at.items()]
    blocks: list = [Table(["edge of the final circuit", f"forms at step ({FORMED_AT:.0%} of its final |score|)"],
                          rows, sortable=True,
                          caption=f"The {len(res.edges)} edges of the final circuit ({final.method}) over "
                                  f"{len(res.steps)} checkpoints")]
    for name, fig in res.figures().items():
        blocks.append(Figure(name, fig))
    return blocks
