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


@torch.no_grad()
def acdc(runner: EdgeRunner, threshold: float, progress: bool = False) -> tuple[Tensor, Tensor]:
    """ACDC: destinations in reverse topological order, each incoming edge (sources in reverse order) removed
    when that moves the metric by less than ``threshold`` (for ``kl``: raises it by less); each candidate
    resumes from the destination's layer with the clean run's prefix. Returns (mask kept, score per edge)."""
    g = runner.graph
    M = g.allowed.to(runner.A.dtype).clone()
    scores = torch.zeros(g.allowed.shape, dtype=torch.float64)
    current = float(runner.value(runner.forward(M)))
    kl = runner.metric == "kl"
    bar = tqdm(total=g.n_edges, disable=not progress, desc=f"ACDC (threshold {threshold:g})")
    heads_now: dict[int, Tensor] = {}  # per layer: its heads' outputs under the current mask
    for d in reversed(range(len(g.dests))):
        start = runner.start_of(d)
        name = g.dests[d]
        head = int(name.split(".")[0].split("H")[1]) if "." in name else None
        if head is not None and start[0] not in heads_now:  # the layer's inputs are all still clean here
            n_out = runner.prefix[(start[0], False)][0]
            heads_now[start[0]] = runner.A[n_out:n_out + g.n_heads].clone()
        for s in reversed(range(len(g.sources))):
            if not g.allowed[s, d]:
                continue
            M[s, d] = 0
            if head is None:
                logits = runner.forward(M, start)
            else:  # only this head's output changes in its layer
                out = runner.head_output(start[0], head, M)
                heads = heads_now[start[0]].clone()
                heads[head] = out
                logits = runner._run(None, M, start, heads=heads)[0]
            new = float(runner.value(logits))
            change = new - current if kl else abs(new - current)
            scores[s, d] = change
            if change < threshold:
                current = new
                if head is not None:
                    heads_now[start[0]][head] = out
            else:
                M[s, d] = 1
            bar.update(1)
    bar.close()
    return M.bool() & g.allowed, scores
