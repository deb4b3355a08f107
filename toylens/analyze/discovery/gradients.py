"""EAP's scores from gradients: ``(corrupted - clean value of u) . d metric / d input_v`` summed over prompts and
positions, for every edge at once, accumulated over one (EAP) or several (EAP-IG) forward and backward passes.

With every edge on, every destination input is the residual stream, so one plain forward and backward gives all
the gradients: a head's q/k/v input gradient is its projection's gradient ``g`` taken back through its rows of
W_Q/W_K/W_V and the norm. In closed form (LayerNorm; RMS drops ``mean(u)``; the Pre variants have gamma 1), with
``u = gamma * (W^T g)`` and ``xh`` the normalised input before its affine, that gradient is
``(u - mean(u) - xh * mean(u * xh)) / scale``; dotted with a source's ``diff`` it splits into
``(diff W'^T) . (g / scale)`` (``W' = W diag(gamma)``; ``g / scale`` summed over steps, the projection of
``diff`` made once), ``sum(diff) * mean(u) / scale`` and ``(diff . xh) * mean(u * xh) / scale`` (small per-step
terms). No ``[3 * heads, n, pos, d_model]`` tensor is ever made. ``split_gradients`` is the slow, obvious
reference (autograd on one copy of the residual stream per destination); the tests hold the two equal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from toylens.analyze.discovery.edges import EdgeRunner


class EdgeGradients:
    """Accumulates the edge scores' gradient terms over passes (``add``) and returns them (``scores``)."""

    def __init__(self, runner: EdgeRunner):
        self.r, self.eng, self.g = runner, runner.eng, runner.graph
        self.diff = runner.C - runner.A  # [n_src, n, T, d_model]: corrupted less clean value of every source
        self.G: dict[int, Tensor] = {}  # layer -> sum of g / scale  [n, T, 3, H, d_head]
        self.mean_u: dict[int, Tensor] = {}  # layer -> sum of mean(u) / scale  [n, T, 3, H]  (LayerNorm)
        self.xh_term: dict[int, Tensor] = {}  # layer -> sum over passes of sum_{n,t} (diff . xh) mean(u xh) / scale
        self.dense: dict[int, Tensor] = {}  # destination (an MLP's input, the logits) -> summed gradient
        self.passes = 0

    def _w(self, layer: int) -> Tensor:
        """``W diag(gamma)`` of the layer's q, k and v: ``[3, H, d_head, d_model]``."""
        L, e = self.eng.layers[layer], self.eng
        w = L.w_qkv.reshape(3, e.n_heads, e.d_head, e.d_model)
        return w * L.ln1[0] if L.ln1[0] is not None else w

    def _n_src(self, layer: int) -> int:
        return 1 + layer * (self.g.n_heads + (not self.g.attn_only))

    def _add(self, store: dict, key: int, value: Tensor) -> None:
        store[key] = value if key not in store else store[key] + value

    def add(self, embed: Tensor | None = None) -> None:
        """One forward and backward with every edge on, from the clean embedding (or ``embed``)."""
        eng, g, r = self.eng, self.g, self.r
        keep: list[tuple[str, int, Tensor, Tensor]] = []  # (kind, layer, norm input, what to differentiate)
        with torch.enable_grad():
            x = (r.A[0] if embed is None else embed).detach().requires_grad_(True)
            for layer in range(g.n_layers):
                lay = eng.layers[layer]
                p = eng.project(layer, eng.norm(x, lay.ln1))  # [n, T, 3, H, d_head]
                keep.append(("attn", layer, x, p))
                q, k, v = p.unbind(-3)
                z = eng.attention(layer, eng.rotate(layer, q), eng.rotate(layer, k), v)
                x = x + eng.head_outputs(layer, z).sum(0) + lay.b_o
                if not g.attn_only:
                    x_mlp = x.view_as(x)  # the MLP's own input: its gradient is the MLP path's alone
                    keep.append(("mlp", layer, x, x_mlp))
                    x = x + eng.mlp(layer, eng.norm(x_mlp, lay.ln2))
            keep.append(("logits", g.n_layers, x, x))
            value = r.value(eng.unembed.at(x, r.answer_pos, per_row=True))
            grads = torch.autograd.grad(value, [t for *_, t in keep])
        d = 0
        for (kind, layer, x_in, _), grad in zip(keep, grads, strict=True):
            if kind == "attn":
                self._attn(layer, x_in.detach(), grad)
                d += 3 * g.n_heads
            elif kind == "mlp":
                self._add(self.dense, d, grad)
                d += 1
            else:
                self._add(self.dense, d, grad)
        self.passes += 1

    def _attn(self, layer: int, x: Tensor, grad_p: Tensor) -> None:
        eng = self.eng
        if eng.norm_type is None:
            self._add(self.G, layer, grad_p)
            return
        xc, scale = eng.norm_parts(x)  # scale [n, T, 1]
        xh = xc / scale
        gs = grad_p / scale[..., None, None]  # g / scale
        self._add(self.G, layer, gs)
        w = self._w(layer)
        # mean(u * xh) / scale = (g / scale) . (W' xh) / d_model
        m = (gs * F.linear(xh, w.flatten(0, 2)).view(gs.shape)).sum(-1) / eng.d_model  # [n, T, 3, H]
        dx = (self.diff[:self._n_src(layer)] * xh).sum(-1)  # [S, n, T]
        self._add(self.xh_term, layer, torch.einsum("snt,ntph->sph", dx, m))
        if eng.norm_type in ("LN", "LNPre"):
            self._add(self.mean_u, layer, (gs * w.sum(-1)).sum(-1) / eng.d_model)

    def scores(self) -> Tensor:
        """Every edge's score ``[n_src, n_dst]`` (float64, on the CPU), averaged over the passes."""
        g, H = self.g, self.g.n_heads
        scores = torch.zeros(g.allowed.shape, dtype=torch.float64)
        d = 0
        for layer in range(g.n_layers):
            S = self._n_src(layer)
            diff = self.diff[:S]
            proj = F.linear(diff, self._w(layer).flatten(0, 2))  # diff W'^T: [S, n, T, 3 * H * d_head]
            s = (proj * self.G[layer].flatten(-3)).unflatten(-1, (3, H, -1)).sum((1, 2, 5))  # [S, 3, H]
            if layer in self.mean_u:
                s = s - torch.einsum("snt,ntph->sph", diff.sum(-1), self.mean_u[layer])
            if layer in self.xh_term:
                s = s - self.xh_term[layer]
            scores[:S, d:d + 3 * H] = s.flatten(1).double().cpu()
            d += 3 * H
            if not g.attn_only:
                scores[:S + H, d] = self._dense_scores(d, S + H)
                d += 1
        scores[:, d] = self._dense_scores(d, len(g.sources))
        return scores / self.passes

    def _dense_scores(self, d: int, n_src: int) -> Tensor:
        return (self.diff[:n_src].flatten(1) @ self.dense[d].flatten()).double().cpu()


def split_gradients(runner: EdgeRunner, embed: Tensor | None = None) -> list[tuple[int, int, Tensor]]:
    """d metric / d (every destination input) by autograd on the split inputs of the masked forward (one copy of
    the residual stream per destination): ``(first destination, number of sources, gradient)`` per group."""
    grads: list = []
    with torch.enable_grad():
        # the graph starts at the embedding (the engine's weights are detached: no parameter gradients)
        e = (runner.A[0] if embed is None else embed).detach().requires_grad_(True)
        M = runner.graph.allowed.to(runner.A.dtype)
        logits = runner._run(runner.pairs.clean[:, :runner.T], M, grads=grads, embed=e)[0]
        value = runner.value(logits)
        gs = torch.autograd.grad(value, [x for _, _, x in grads])
    return [(d, n_src, g) for (d, n_src, _), g in zip(grads, gs, strict=True)]


def split_scores(runner: EdgeRunner, grads: list[tuple[int, int, Tensor]]) -> Tensor:
    """The scores from ``split_gradients``: ``diff . gradient`` per edge, summed over prompts and positions."""
    diff = runner.C - runner.A
    scores = torch.zeros(runner.graph.allowed.shape, dtype=torch.float64)
    for d, n_src, g in grads:
        g = g if g.ndim == 4 else g[None]  # one destination (an MLP's input, the logits)
        s = torch.einsum("snpd,vnpd->sv", diff[:n_src].expand(n_src, *g.shape[1:]), g)
        scores[:n_src, d:d + g.shape[0]] = s.double().cpu()
    return scores
