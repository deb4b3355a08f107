"""ACDC (Conmy et al. 2023) on an ``EdgeRunner``, incrementally: every destination's input, every head's q/k/v
projections and every node's output under the current circuit are kept, so a candidate edge costs its
destination's node plus only the nodes downstream whose inputs it changes (usually just the logits). The last
layer is computed at the answer positions alone (its queries, MLP and the logits read nothing else)."""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from toylens.analyze.discovery.edges import EdgeRunner


class _Circuit:
    """The current run under mask ``M``. ACDC visits destinations in reverse topological order, so a candidate
    destination's sources still hold their clean values: removing ``s -> d`` subtracts ``A[s] - C[s]`` from d's
    input, and the change flows forward through the edges still on."""

    def __init__(self, runner: EdgeRunner, M: Tensor):
        self.r, self.eng, self.g, self.M = runner, runner.eng, runner.graph, M
        g, eng = self.g, self.eng
        self.H, self.L, self.mlps = g.n_heads, g.n_layers, not g.attn_only
        self.rows = torch.arange(runner.pairs.batch_size, device=runner.A.device)
        self.qpos = runner.answer_pos[:, None]  # [n, 1]: the last layer's queries
        self.logits_dest = len(g.dests) - 1
        last = self.L - 1
        # narrow destinations, held at the answer positions only ([n, 1, d_model]): the last layer's queries and
        # MLP input, and the logits; so are the last layer's outputs
        self.narrow = torch.zeros(len(g.dests), dtype=torch.bool)
        self.narrow[[self.dest(last, 0, h) for h in range(self.H)] + [self.logits_dest]] = True
        if self.mlps:
            self.narrow[self.dest(last, 3)] = True
        self.D = runner.A - runner.C  # clean less ablated value of every source
        self.out = list(runner.A.unbind(0))  # every source's value in the current run
        for s in range(self.src(last, 0), len(g.sources)):
            self.out[s] = self.at_answers(self.out[s])
        self.x: dict[int, Tensor] = {}  # every destination's input
        self.proj: dict[tuple[int, str], Tensor] = {}  # (layer, part) -> [n, T or 1, H, d_head], q and k rotated
        for layer in range(self.L):
            resid = runner.prefix[(layer, False)][1]
            h = eng.norm(resid, eng.layers[layer].ln1)
            for p, part in enumerate("qkv"):
                narrow = layer == last and part == "q"
                self.proj[(layer, part)] = self._project(layer, self.at_answers(h) if narrow else h, part,
                                                         narrow=narrow)
                for head in range(self.H):
                    self.x[self.dest(layer, p, head)] = self.at_answers(resid) if narrow else resid
            if self.mlps:
                x = runner.prefix[(layer, True)][1]
                self.x[self.dest(layer, 3)] = self.at_answers(x) if layer == last else x
        self.x[self.logits_dest] = self.at_answers(runner.prefix[(self.L, False)][1])

    # --- indices ---------------------------------------------------------------------------------------
    def dest(self, layer: int, part: int, head: int = 0) -> int:
        """Destination index of a head's q/k/v input (part 0-2) or the MLP's input (part 3)."""
        return layer * (3 * self.H + self.mlps) + part * self.H + head

    def src(self, layer: int, head: int | None) -> int:
        """Source index of head ``head`` of ``layer`` (None: its MLP)."""
        return 1 + layer * (self.H + self.mlps) + (self.H if head is None else head)

    def at_answers(self, x: Tensor) -> Tensor:
        """``[n, T, ...]`` -> ``[n, 1, ...]`` at each row's answer position."""
        return x[self.rows, self.r.answer_pos][:, None]

    def fit(self, t: Tensor, w: int) -> Tensor:
        """A source's value as destination ``w`` reads it (at the answers only, if ``w`` is narrow)."""
        return self.at_answers(t) if self.narrow[w] and t.shape[1] != 1 else t

    # --- the nodes ---------------------------------------------------------------------------------------
    def _project(self, layer: int, h: Tensor, part: str, head: int | None = None, narrow: bool = False) -> Tensor:
        """``[n, T, H, d_head]`` of every head from a shared input, or ``[n, T, 1, d_head]`` of ``head``;
        ``narrow``: ``h`` holds the answer positions only (rotated there)."""
        eng = self.eng
        p = eng.project(layer, h, part) if head is None else eng.project_heads(layer, h, part, head)[..., None, :]
        return eng.rotate(layer, p, self.qpos if narrow else None) if part != "v" else p

    def _head(self, layer: int, head: int, parts: dict[str, Tensor]) -> Tensor:
        """Head output ``[n, T, d_model]`` (last layer: ``[n, 1, d_model]``) from its q/k/v (``parts`` overriding
        the kept projections)."""
        q, k, v = (parts[p] if p in parts else self.proj[(layer, p)][:, :, head:head + 1] for p in "qkv")
        z = self.eng.attention(layer, q, k, v, qpos=self.qpos if layer == self.L - 1 else None)
        return self.eng.head_outputs(layer, z[:, :, 0], head)

    # --- one candidate ---------------------------------------------------------------------------------
    def trial(self, s: int, d: int) -> tuple[Tensor, dict]:
        """Logits at the answers with edge ``s -> d`` also removed, and the state to commit if it stays removed."""
        eng, x_d = self.eng, self.x[d]
        new = {"x": {}, "proj": {}, "out": {}}
        x_d = x_d - self.fit(self.D[s], d)
        new["x"][d] = x_d
        if d == self.logits_dest:
            return eng.unembed(x_d[:, 0]), new
        layer, is_mlp = self.g.dest_layer(d)
        delta: dict[int, Tensor] = {}
        if is_mlp:
            node = self.src(layer, None)
            new["out"][node] = eng.mlp(layer, eng.norm(x_d, eng.layers[layer].ln2))
        else:
            part, head = divmod(d - self.dest(layer, 0), self.H)
            part = "qkv"[part]
            p = self._project(layer, eng.norm(x_d, eng.layers[layer].ln1), part, head, bool(self.narrow[d]))
            new["proj"][(layer, part, head)] = p
            node = self.src(layer, head)
            new["out"][node] = self._head(layer, head, {part: p})
        delta[node] = new["out"][node] - self.out[node]
        return self._downstream(layer, not is_mlp and self.mlps, delta, new), new

    def _contribution(self, w: int, delta: dict[int, Tensor]) -> Tensor | None:
        parts = [self.fit(dv, w) for s, dv in delta.items() if self.M[s, w]]
        return None if not parts else parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)

    def _downstream(self, layer: int, mlp_next: bool, delta: dict[int, Tensor], new: dict) -> Tensor:
        """Carry the changed outputs ``delta`` forward from ``layer`` (its MLP half when ``mlp_next``, else the
        next layer) to the logits."""
        eng = self.eng
        if not mlp_next:
            layer += 1
        for lay in range(layer, self.L):
            if not mlp_next:  # the attention half
                changed: dict[int, dict[str, Tensor]] = {}
                for p, part in enumerate("qkv"):
                    for head in range(self.H):
                        w = self.dest(lay, p, head)
                        c = self._contribution(w, delta)
                        if c is None:
                            continue
                        xw = self.x[w] + c
                        new["x"][w] = xw
                        proj = self._project(lay, eng.norm(xw, eng.layers[lay].ln1), part, head, bool(self.narrow[w]))
                        new["proj"][(lay, part, head)] = proj
                        changed.setdefault(head, {})[part] = proj
                for head, parts in changed.items():
                    node = self.src(lay, head)
                    new["out"][node] = self._head(lay, head, parts)
                    delta[node] = new["out"][node] - self.out[node]
            mlp_next = False
            if self.mlps:
                w = self.dest(lay, 3)
                c = self._contribution(w, delta)
                if c is not None:
                    xw = self.x[w] + c
                    new["x"][w] = xw
                    node = self.src(lay, None)
                    new["out"][node] = eng.mlp(lay, eng.norm(xw, eng.layers[lay].ln2))
                    delta[node] = new["out"][node] - self.out[node]
        c = self._contribution(self.logits_dest, delta)
        x = self.x[self.logits_dest] if c is None else self.x[self.logits_dest] + c
        new["x"][self.logits_dest] = x
        return eng.unembed(x[:, 0])

    def commit(self, new: dict) -> None:
        self.x.update(new["x"])
        for s, v in new["out"].items():
            self.out[s] = v
        for (layer, part, head), p in new["proj"].items():
            self.proj[(layer, part)][:, :, head:head + 1] = p  # computed here: ours to write into


@torch.no_grad()
def acdc(runner: EdgeRunner, threshold: float, progress: bool = False) -> tuple[Tensor, Tensor]:
    """ACDC: destinations in reverse topological order, each incoming edge (sources in reverse order) removed
    when that moves the metric by less than ``threshold`` (for ``kl``: raises it by less). Returns (mask kept,
    score per edge: the metric's change when the edge was tried)."""
    g = runner.graph
    M = g.allowed.to(runner.A.dtype).clone()
    scores = torch.zeros(g.allowed.shape, dtype=torch.float64)
    state = _Circuit(runner, M)
    current = float(runner.value(runner.forward(M)))
    kl = runner.metric == "kl"
    bar = tqdm(total=g.n_edges, disable=not progress, desc=f"ACDC (threshold {threshold:g})")
    for d in reversed(range(len(g.dests))):
        for s in reversed(range(len(g.sources))):
            if not g.allowed[s, d]:
                continue
            M[s, d] = 0
            logits, new = state.trial(s, d)
            value = float(runner.value(logits))
            change = value - current if kl else abs(value - current)
            scores[s, d] = change
            if change < threshold:
                current = value
                state.commit(new)
            else:
                M[s, d] = 1
            bar.update(1)
    bar.close()
    return M.bool() & g.allowed, scores
