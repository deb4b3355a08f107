"""The discovery methods on an ``EdgeRunner``: exact per-edge patching, EAP (Syed et al. 2023), EAP-IG (Hanna et
al. 2024) and ACDC (Conmy et al. 2023); each returns a score for every edge ``[n_src, n_dst]`` (0 where none)."""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from toylens.analyze.discovery.edges import EdgeRunner


def _gradients(runner: EdgeRunner, embed: Tensor | None = None) -> list[tuple[int, int, Tensor]]:
    """d metric / d (every destination input) with every edge on, on the clean run (or from the embedding
    ``embed``). Every destination input then equals the residual stream, so one plain forward and backward
    gives them all: a head's q/k/v input gradient is its own projection's gradient taken back through its rows
    of W_Q/W_K/W_V and the norm (the norm's vector-Jacobian product batched over heads). Checked against
    autograd on split inputs (``_split_gradients``) and TransformerLens hooks (tests)."""
    eng, g = runner.eng, runner.graph
    keep: list[tuple[str, int, Tensor, Tensor]] = []  # (kind, layer, norm input, what to differentiate)
    with torch.enable_grad():
        x = (runner.A[0] if embed is None else embed).detach().requires_grad_(True)
        for layer in range(g.n_layers):
            lay = eng.layers[layer]
            h = eng.norm(x, lay.ln1)
            p = eng.project(layer, h)  # [n, T, 3, H, d_head]
            keep.append(("attn", layer, x, p))
            q, k, v = p.unbind(-3)
            z = eng.attention(layer, eng.rotate(layer, q), eng.rotate(layer, k), v)
            x = x + eng.head_outputs(layer, z).sum(0) + lay.b_o
            if not g.attn_only:
                h2 = eng.norm(x, lay.ln2)
                h2 = x.view_as(x) if h2 is x else h2  # no norm: the MLP's own path, not the residual's
                keep.append(("mlp", layer, x, h2))
                x = x + eng.mlp(layer, h2)
        keep.append(("logits", g.n_layers, x, x))
        value = runner.value(eng.unembed.at(x, runner.answer_pos, per_row=True))
        gs = torch.autograd.grad(value, [t for *_, t in keep])
    out, d, n_src = [], 0, 1
    for (kind, layer, x_in, _), grad in zip(keep, gs, strict=True):
        if kind == "logits":
            out.append((d, n_src, grad))
            continue
        if kind == "attn":
            out.append((d, n_src, eng.head_input_grads(layer, x_in.detach(), grad)))
            d, n_src = d + 3 * g.n_heads, n_src + g.n_heads
        else:
            ln2 = eng.layers[layer].ln2
            _, back = torch.func.vjp(lambda t, ln2=ln2: eng.norm(t, ln2), x_in.detach())
            out.append((d, n_src, back(grad)[0]))
            d, n_src = d + 1, n_src + 1
    return out


def _split_gradients(runner: EdgeRunner, embed: Tensor | None = None) -> list[tuple[int, int, Tensor]]:
    """The same by autograd on the split inputs of the masked forward (one copy of the residual stream per
    destination): the slow, obvious way, kept as the tests' reference."""
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
