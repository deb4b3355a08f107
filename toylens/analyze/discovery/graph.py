"""The computational graph circuit discovery works on: its nodes, their names, and which edges exist.

Sources: ``embed`` (token + position; token only under positional "none" or rotary), every head ``L{l}H{h}`` (its
output ``z @ W_O``, without ``b_O``) and every MLP ``MLP{l}`` (its output, with ``b_out``). Destinations: each
head's query, key and value inputs ``L{l}H{h}.q`` / ``.k`` / ``.v``, each MLP's input ``MLP{l}``, and ``logits``
(``ln_final``'s input). An edge ``u -> v`` is u's contribution to v's input through the residual stream; the
biases (``b_O``) are constant parts of every input. Names are the same in results, the report and report.json.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class Graph:
    """Sources and destinations in topological order, and ``allowed[src, dst]``: the edges that exist."""

    n_layers: int
    n_heads: int
    attn_only: bool
    sources: tuple[str, ...]
    dests: tuple[str, ...]
    allowed: Tensor  # bool [n_src, n_dst]

    @classmethod
    def of(cls, n_layers: int, n_heads: int, attn_only: bool) -> Graph:
        sources, dests, reads_upto = ["embed"], [], []  # reads_upto: sources written before each destination
        for layer in range(n_layers):
            heads = [f"L{layer}H{h}" for h in range(n_heads)]
            for part in "qkv":
                for head in heads:
                    dests.append(f"{head}.{part}")
                    reads_upto.append(len(sources))
            sources += heads
            if not attn_only:
                dests.append(f"MLP{layer}")
                reads_upto.append(len(sources))
                sources.append(f"MLP{layer}")
        dests.append("logits")
        reads_upto.append(len(sources))
        allowed = torch.arange(len(sources))[:, None] < torch.tensor(reads_upto)[None, :]
        return cls(n_layers, n_heads, attn_only, tuple(sources), tuple(dests), allowed)

    @property
    def n_edges(self) -> int:
        return int(self.allowed.sum())

    def edges(self) -> list[tuple[str, str]]:
        """Every edge ``(src, dst)``, destinations in topological order, sources in order within each."""
        return [(self.sources[s], self.dests[d]) for d in range(len(self.dests))
                for s in range(len(self.sources)) if self.allowed[s, d]]

    def index(self, src: str, dst: str) -> tuple[int, int]:
        try:
            s, d = self.sources.index(src), self.dests.index(dst)
        except ValueError:
            raise KeyError(f"edge {src!r} -> {dst!r}: unknown node; sources are {list(self.sources)}, "
                           f"destinations {list(self.dests)}") from None
        if not self.allowed[s, d]:
            raise KeyError(f"edge {src!r} -> {dst!r} does not exist ({src} is not written before {dst} reads)")
        return s, d

    def mask(self, edges: list[tuple[str, str]] | None = None) -> Tensor:
        """A float mask ``[n_src, n_dst]``: 1 for the given edges (default all), 0 elsewhere."""
        m = torch.zeros(self.allowed.shape)
        if edges is None:
            return self.allowed.float()
        for src, dst in edges:
            m[self.index(src, dst)] = 1.0
        return m

    def dest_layer(self, d: int) -> tuple[int, bool]:
        """(layer, is the MLP input) of destination ``d``; the logits are layer ``n_layers``."""
        name = self.dests[d]
        if name == "logits":
            return self.n_layers, False
        if name.startswith("MLP"):
            return int(name[3:]), True
        return int(name[1:name.index("H")]), False
