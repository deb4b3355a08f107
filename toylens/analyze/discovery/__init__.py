"""Circuit discovery: which head reads which head. Edge scores by exact patching, EAP, EAP-IG or ACDC, the
circuit they choose, and its faithfulness curve (exact edge patching), on the graph of ``discovery.graph``.

    result = discover(model, pairs, method="eap", metric="logit_diff", top_n=20)
    result.circuit, result.faithfulness, result.figures()
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import Tensor

from toylens._compat import HookedTransformer
from toylens.analyze.discovery import methods
from toylens.analyze.discovery.edges import DISCOVERY_METRICS, DiscoveryError, EdgeRunner
from toylens.analyze.discovery.graph import Graph
from toylens.analyze.pairs import PromptPairs
from toylens.result import Result

METHODS = ("exact", "eap", "eap_ig", "acdc")
__all__ = ["DISCOVERY_METRICS", "METHODS", "DiscoveryError", "DiscoveryResult", "EdgeRunner", "Graph", "discover",
           "faithfulness_curve"]


@dataclasses.dataclass
class DiscoveryResult(Result):
    """Every edge's score and whether it is in the chosen circuit, plus the faithfulness curve: the metric
    recovered (0 = every edge corrupted, 1 = clean) against the number of edges kept (best first)."""

    method: str
    metric: str
    edges: list[dict]  # {"src", "dst", "score", "in_circuit"}, best first
    faithfulness: dict  # {"n_edges": [...], "recovered": [...], "circuit_recovered": float}
    clean_value: float
    corrupted_value: float
    settings: dict

    @property
    def circuit(self) -> list[tuple[str, str]]:
        return [(e["src"], e["dst"]) for e in self.edges if e["in_circuit"]]

    def figures(self) -> dict:
        from toylens.analyze.discovery.plots import circuit_figure, faithfulness_figure

        return {"discovery/circuit": circuit_figure(self), "discovery/faithfulness": faithfulness_figure(self)}


def _ranked(graph: Graph, scores: Tensor) -> list[tuple[int, int, float]]:
    """Edges best first: by |score|, ties in graph order."""
    edges = [(s, d, float(scores[s, d])) for d in range(len(graph.dests)) for s in range(len(graph.sources))
             if graph.allowed[s, d]]
    return sorted(edges, key=lambda e: -abs(e[2]) if math.isfinite(e[2]) else 0.0)


@torch.no_grad()
def faithfulness_curve(runner: EdgeRunner, ranked: list[tuple[int, int, float]], points: int = 16) -> dict:
    """Metric recovered by the top-k edges, by exact edge patching, for k on a grid from 0 to every edge."""
    n = len(ranked)
    ks = sorted({round(n * i / (points - 1)) for i in range(points)} | {0, n})
    out = {"n_edges": [], "recovered": []}
    for k in ks:
        M = torch.zeros(runner.graph.allowed.shape, dtype=runner.A.dtype)
        for s, d, _ in ranked[:k]:
            M[s, d] = 1
        out["n_edges"].append(k)
        out["recovered"].append(runner.recovered(runner.value(runner.forward(M))))
    return out


def discover(model: HookedTransformer, pairs: PromptPairs, method: str = "eap", metric: str | Callable = "logit_diff",
             *, threshold: float | None = None, top_n: int | None = None, target: float | None = None,
             ablation: str = "corrupted", ig_steps: int = 5, points: int = 16, progress: bool = False,
             runner: EdgeRunner | None = None) -> DiscoveryResult:
    """Score every edge with ``method`` and choose a circuit: ACDC's own, or the edges above ``threshold`` (|score|),
    the ``top_n`` best, or the smallest top-k recovering ``target`` of the metric (default: ``target=0.9``)."""
    if method not in METHODS:
        raise DiscoveryError(f"method={method!r} is unknown; choose from {list(METHODS)}")
    if sum(x is not None for x in (threshold, top_n, target)) > 1 and method != "acdc":
        raise DiscoveryError("choose the circuit by one of threshold=, top_n= or target=")
    runner = runner or EdgeRunner(model, pairs, metric, ablation)
    g = runner.graph
    kept = None
    if method == "acdc":
        if threshold is None:
            raise DiscoveryError("method='acdc' needs threshold= (e.g. 0.01 for metric='kl')")
        kept, scores = methods.acdc(runner, threshold, progress)
    elif method == "exact":
        scores = methods.exact(runner, progress)
    elif method == "eap":
        scores = methods.eap(runner)
    else:
        scores = methods.eap_ig(runner, ig_steps, progress)
    ranked = _ranked(g, scores)
    curve = faithfulness_curve(runner, ranked, points)
    if kept is None:
        if threshold is not None:
            chosen = {(s, d) for s, d, v in ranked if abs(v) > threshold}
        elif top_n is not None:
            chosen = {(s, d) for s, d, _ in ranked[:top_n]}
        else:
            goal = 0.9 if target is None else target
            k = next((k for k, r in zip(curve["n_edges"], curve["recovered"], strict=True) if r >= goal), len(ranked))
            chosen = {(s, d) for s, d, _ in ranked[:k]}
        kept = torch.zeros(g.allowed.shape, dtype=torch.bool)
        for s, d in chosen:
            kept[s, d] = True
    curve["circuit_recovered"] = runner.recovered(runner.value(runner.forward(kept.to(runner.A.dtype))))
    edges = [{"src": g.sources[s], "dst": g.dests[d], "score": v, "in_circuit": bool(kept[s, d])}
             for s, d, v in ranked]
    settings = {"threshold": threshold, "top_n": top_n, "target": target, "ablation": ablation,
                "ig_steps": ig_steps if method == "eap_ig" else None, "n_prompts": pairs.batch_size,
                "n_edges": g.n_edges}
    return DiscoveryResult(method=method, metric=runner.metric_label, edges=edges, faithfulness=curve,
                           clean_value=float(runner.clean_value), corrupted_value=float(runner.corrupted_value),
                           settings=settings)
