"""The discovery methods on an ``EdgeRunner``: exact per-edge patching, EAP (Syed et al. 2023), EAP-IG (Hanna et
al. 2024) and ACDC (Conmy et al. 2023); each returns a score for every edge ``[n_src, n_dst]`` (0 where none)."""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from toylens.analyze.discovery.edges import EdgeRunner
from toylens.analyze.discovery.gradients import EdgeGradients


def eap(runner: EdgeRunner) -> Tensor:
    """EAP: ``(a_u(corrupted) - a_u(clean)) . d metric / d input_v`` from one clean forward and backward."""
    grads = EdgeGradients(runner)
    grads.add()
    return grads.scores()


def eap_ig(runner: EdgeRunner, steps: int = 5, progress: bool = False) -> Tensor:
    """EAP-IG: the gradients averaged along the straight path from the corrupted to the clean embedding
    (``steps`` points ``k / steps``, k = 1..steps), integrated on the embeddings."""
    if steps < 1:
        raise ValueError(f"steps={steps}: must be at least 1")
    clean, corrupted = runner.A[0], runner.C[0].expand_as(runner.A[0])
    grads = EdgeGradients(runner)
    for k in tqdm(range(1, steps + 1), disable=not progress, desc="EAP-IG"):
        grads.add(corrupted + k / steps * (clean - corrupted))
    return grads.scores()


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
