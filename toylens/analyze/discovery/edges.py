"""Exact edge patching on the fused engine: the model run with any set of edges replaced by their corrupted
(or mean) value, per destination input; the reference every discovery method is checked against."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from toylens._compat import HookedTransformer
from toylens.analyze.discovery.graph import Graph
from toylens.analyze.metrics import METRICS, metric_name
from toylens.analyze.pairs import PromptPairs
from toylens.model.eligibility import fast_path_reason
from toylens.model.fused import Engine

DISCOVERY_METRICS = ("logit_diff", "loss", "accuracy", "kl")


class DiscoveryError(ValueError):
    """A model, metric or setting circuit discovery cannot use; the message names it and the fix."""


class EdgeRunner:
    """The clean prompts run through the graph with a mask ``M[src, dst]`` (1: the edge carries the source's
    value in this run, 0: its corrupted value). ``ablation="mean"`` uses the mean over prompts of the clean
    sources instead of the corrupted prompts."""

    def __init__(self, model: HookedTransformer, pairs: PromptPairs, metric: str | Callable = "logit_diff",
                 ablation: str = "corrupted"):
        why = fast_path_reason(model)
        if why:
            raise DiscoveryError(f"circuit discovery runs on the fused engine, which does not compute this model "
                                 f"({why})")
        if ablation not in ("corrupted", "mean"):
            raise DiscoveryError(f"ablation={ablation!r}; choose 'corrupted' or 'mean'")
        if not callable(metric) and metric not in DISCOVERY_METRICS:
            raise DiscoveryError(f"metric={metric!r} is unknown; choose from {list(DISCOVERY_METRICS)}")
        self.model, self.eng = model, Engine(model)
        c = model.cfg
        self.graph = Graph.of(c.n_layers, c.n_heads, c.attn_only)
        self.pairs = pairs = pairs.to(c.device)
        self.metric, self.metric_label = metric, metric_name(metric)
        self.T = int(pairs.answer_pos.max()) + 1 if c.attention_dir == "causal" else pairs.n_pos
        self.answer_pos = pairs.answer_pos
        with torch.no_grad():
            self.C = None
            corr_logits, corr_outs, _ = self._run(pairs.corrupted[:, :self.T], self.graph.allowed.float())
            clean_logits, clean_outs, self.prefix = self._run(pairs.clean[:, :self.T], self.graph.allowed.float(),
                                                              keep_prefix=True)
            self.A = torch.stack(clean_outs)  # [n_src, n, T, d_model]
            self.C = torch.stack(corr_outs) if ablation == "corrupted" else self.A.mean(1, keepdim=True)
            self.clean_logp = clean_logits.log_softmax(-1)
            self.clean_value = self.value(clean_logits)
            self.corrupted_value = self.value(self.forward(torch.zeros_like(self.graph.allowed, dtype=torch.float)))

    # --- the metric --------------------------------------------------------------------------------
    def per_prompt(self, logits: Tensor) -> Tensor:
        """The metric of each prompt from the logits at its answer position."""
        if self.metric == "kl":
            logp = logits.log_softmax(-1)
            return (self.clean_logp.exp() * (self.clean_logp - logp)).sum(-1)
        fn = self.metric if callable(self.metric) else METRICS[self.metric]
        return fn(logits, self.pairs)

    def value(self, logits: Tensor) -> Tensor:
        return self.per_prompt(logits).mean()

    def recovered(self, value: float) -> float:
        """0 = every edge corrupted, 1 = clean."""
        span = float(self.clean_value) - float(self.corrupted_value)
        return float("nan") if span == 0 else (float(value) - float(self.corrupted_value)) / span

    # --- the masked forward --------------------------------------------------------------------------
    def _inputs(self, outs: list[Tensor], resid: Tensor, m: Tensor) -> Tensor:
        """Destination inputs ``[n_dst, n, T, d_model]``: the residual stream minus, for every edge that is
        off, the source's value in this run less its corrupted value."""
        off = 1.0 - m[: len(outs)]  # [S, n_dst]
        used = off.any(1).nonzero().flatten().tolist()
        x = resid.expand(m.shape[1], *resid.shape)
        if not used:
            return x
        diff = torch.stack([outs[s] for s in used]) - self.C[used]
        return x - torch.einsum("snpd,sv->vnpd", diff, off[used].to(diff.dtype))

    def _run(self, tokens: Tensor | None, M: Tensor, start: tuple[int, bool] = (0, False), keep_prefix: bool = False,
             grads: list | None = None, embed: Tensor | None = None):
        """The masked forward from ``start`` (the clean run's state there)."""
        eng, g = self.eng, self.graph
        H, L = g.n_heads, g.n_layers
        prefix = {}
        layer0, mlp_first = start
        if start == (0, False):
            a = eng.embed(tokens) if embed is None else embed
            outs, resid = [a], a
        else:
            n_out, resid = self.prefix[start]
            outs = list(self.A[:n_out].unbind(0))
        d = sum(3 * H + (not g.attn_only) for _ in range(layer0))  # first destination of layer0
        for layer in range(layer0, L):
            lay = eng.layers[layer]
            if not (layer == layer0 and mlp_first):
                if keep_prefix:
                    prefix[(layer, False)] = (len(outs), resid)
                x = self._inputs(outs, resid, M[:, d:d + 3 * H])  # [3H, n, T, d_model]
                if grads is not None:
                    grads.append((d, len(outs), x))
                h = eng.norm(x, lay.ln1).unflatten(0, (3, H)).movedim(1, -2)  # [3, n, T, H, d_model]
                q, k, v = (eng.project_heads(layer, h[i], part) for i, part in enumerate("qkv"))
                z = eng.attention(layer, eng.rotate(layer, q), eng.rotate(layer, k), v)
                heads = eng.head_outputs(layer, z)  # [H, n, T, d_model]
                outs += list(heads.unbind(0))
                resid = resid + heads.sum(0) + lay.b_o
            d += 3 * H
            if not g.attn_only:
                if keep_prefix:
                    prefix[(layer, True)] = (len(outs), resid)
                x = self._inputs(outs, resid, M[:, d:d + 1])[0]
                if grads is not None:
                    grads.append((d, len(outs), x))
                out = eng.mlp(layer, eng.norm(x, lay.ln2))
                outs.append(out)
                resid = resid + out
                d += 1
        if keep_prefix:
            prefix[(L, False)] = (len(outs), resid)
        x = self._inputs(outs, resid, M[:, d:d + 1])[0]
        if grads is not None:
            grads.append((d, len(outs), x))
        return self.eng.unembed.at(x, self.answer_pos, per_row=True), outs, prefix

    def forward(self, M: Tensor, start: tuple[int, bool] = (0, False)) -> Tensor:
        """Logits at the answer positions with mask ``M`` ``[n_src, n_dst]``. ``start``: resume at (layer, MLP
        half) from the clean run, valid when ``M`` keeps every edge into destinations before it."""
        M = M.to(self.A.device if self.C is not None else M.device)
        return self._run(self.pairs.clean[:, :self.T], M, start)[0]

    def start_of(self, dest: int) -> tuple[int, bool]:
        layer, is_mlp = self.graph.dest_layer(dest)
        return layer, is_mlp
