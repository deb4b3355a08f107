"""The discovery methods on an ``EdgeRunner``: exact per-edge patching, EAP (Syed et al. 2023), EAP-IG (Hanna et
al. 2024) and ACDC (Conmy et al. 2023); each returns a score for every edge ``[n_src, n_dst]`` (0 where none)."""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from toylens.analyze.discovery.edges import EdgeRunner


def _gradients(runner: EdgeRunner, embed: Tensor | None = None) -> list[tuple[int, int, Tensor]]:
    """d metric / d (every destination input) on the clean run (or with the embedding ``embed``)."""
    grads: list = []
    with torch.enable_grad():
        # the graph starts at the embedding (the engine's weights are detached: no parameter gradients)
        e = (runner.A[0] if embed is None else embed).detach().requires_grad_(True)
        M = runner.graph.allowed.to(runner.A.dtype)
        logits = runner._run(runner.pairs.clean[:, :runner.T], M, grads=grads, embed=e)[0]
        value = runner.value(logits)
        gs = torch.autograd.grad(value, [x for _, _, x in grads])
    return [(d, n_src, g) for (d, n_src, _), g in zip(grads, gs, strict=True)]


def _scores_from(runner: EdgeRunner, grads: list[tuple[int, int, Tensor]]) -> Tensor:
    """(corrupted - clean source value) . gradient of the destination input, summed over prompts and positions."""
    diff = runner.C - runner.A  # [n_src, n, T, d_model]
    scores = torch.zeros(runner.graph.allowed.shape, dtype=torch.float64)
    for d, n_src, g in grads:
        g = g if g.ndim == 4 else g[None]  # one destination (an MLP's input, the logits)
        s = torch.einsum("snpd,vnpd->sv", diff[:n_src].expand(n_src, *g.shape[1:]), g)
        scores[:n_src, d:d + g.shape[0]] = s.double().cpu()
    return scores


def eap(runner: EdgeRunner) -> Tensor:
    """EAP: ``(a_u(corrupted) - a_u(clean)) . d metric / d input_v`` from one clean forward and backward."""
    return _scores_from(runner, _gradients(runner))


def eap_ig(runner: EdgeRunner, steps: int = 5, progress: bool = False) -> Tensor:
    """EAP-IG: the gradients averaged along the straight path from the corrupted to the clean embedding
    (``steps`` points ``k / steps``, k = 1..steps), integrated on the embeddings."""
    if steps < 1:
        raise ValueError(f"steps={steps}: must be at least 1")
    clean, corrupted = runner.A[0], runner.C[0].expand_as(runner.A[0])
    total = None
    for k in tqdm(range(1, steps + 1), disable=not progress, desc="EAP-IG"):
        alpha = k / steps
        grads = _gradients(runner, corrupted + alpha * (clean - corrupted))
        total = grads if total is None else [(d, n, t + g) for (d, n, t), (_, _, g) in zip(total, grads, strict=True)]
    return _scores_from(runner, [(d, n, g / steps) for d, n, g in total])


@torch.no_grad()
def exact(runner: EdgeRunner, progress: bool = False) -> Tensor:
    """Each edge patched alone: metric(edge corrupted) - metric(clean), resumed at the destination's layer."""
    g = runner.graph
    scores = torch.zeros(g.allowed.shape, dtype=torch.float64)
    full = g.allowed.to(runner.A.dtype)
    pairs = [(s, d) for d in range(len(g.dests)) for s in range(len(g.sources)) if g.allowed[s, d]]
    for s, d in tqdm(pairs, disable=not progress, desc="edge patching"):
        M = full.clone()
        M[s, d] = 0
        scores[s, d] = float(runner.value(runner.forward(M, runner.start_of(d)))) - float(runner.clean_value)
    return scores


def acdc(runner: EdgeRunner, threshold: float, progress: bool = False) -> tuple[Tensor, Tensor]:
    """ACDC: destinations in reverse topological order, each incoming edge (sources in reverse order) removed
    when that moves the metric by less than ``threshold`` (for ``kl``: raises it by less); each candidate costs
    its destination's node and the nodes downstream it changes (``discovery.acdc``). Returns (mask kept, score
    per edge)."""
    from toylens.analyze.discovery.acdc import acdc as incremental

    return incremental(runner, threshold, progress)
