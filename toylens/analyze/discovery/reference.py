"""Slow, obviously-correct references for circuit discovery, on TransformerLens's own forward with hooks (split
q/k/v inputs, hook_mlp_in, hook_result): edge patching, EAP by autograd and the ACDC loop, one full forward per
evaluation. The tests and benchmarks/circuit_speed.py hold the engine-based methods to them."""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from toylens._compat import HookedTransformer
from toylens.analyze.discovery.graph import Graph
from toylens.analyze.metrics import METRICS
from toylens.analyze.pairs import PromptPairs


def split_model(model: HookedTransformer) -> HookedTransformer:
    """A copy of ``model`` whose every destination input and head output has its own hook point."""
    m = copy.deepcopy(model)
    m.set_use_split_qkv_input(True)
    m.set_use_attn_result(True)
    if not m.cfg.attn_only:
        m.set_use_hook_mlp_in(True)
    return m


def sources_of(m: HookedTransformer, acts: dict) -> dict[str, Tensor]:
    """Source values by node name from the hook values seen so far (embed: block 0's resid_pre)."""
    out = {"embed": acts["blocks.0.hook_resid_pre"]} if "blocks.0.hook_resid_pre" in acts else {}
    for layer in range(m.cfg.n_layers):
        if f"blocks.{layer}.attn.hook_result" in acts:
            for h in range(m.cfg.n_heads):
                out[f"L{layer}H{h}"] = acts[f"blocks.{layer}.attn.hook_result"][:, :, h]
        if f"blocks.{layer}.hook_mlp_out" in acts:
            out[f"MLP{layer}"] = acts[f"blocks.{layer}.hook_mlp_out"]
    return out


def _dest_hooks(m: HookedTransformer) -> list[tuple[str, list[tuple[int | None, str]]]]:
    hooks = []
    for layer in range(m.cfg.n_layers):
        for part in "qkv":
            hooks.append((f"blocks.{layer}.hook_{part}_input",
                          [(h, f"L{layer}H{h}.{part}") for h in range(m.cfg.n_heads)]))
        if not m.cfg.attn_only:
            hooks.append((f"blocks.{layer}.hook_mlp_in", [(None, f"MLP{layer}")]))
    hooks.append((f"blocks.{m.cfg.n_layers - 1}.hook_resid_post", [(None, "logits")]))
    return hooks


def run(m: HookedTransformer, tokens: Tensor, M: Tensor, corrupted: dict[str, Tensor], graph: Graph,
        deltas: dict | None = None) -> Tensor:
    """Logits of ``split_model`` ``m`` with every edge u -> v that ``M`` turns off carrying u's corrupted value: at
    v's own input hook, subtract (u's value in this run - its corrupted value). ``deltas``: a zero leaf that requires
    grad is added at every destination input (for gradients), stored by destination name."""
    store: dict[str, Tensor] = {}

    def keep(act, hook):
        store[hook.name] = act

    def patch(dests):
        def fn(act, hook):
            current = sources_of(m, store)
            act = act.clone()
            for head, dst in dests:
                d = graph.dests.index(dst)
                fix = 0
                for s, src in enumerate(graph.sources):
                    if graph.allowed[s, d] and M[s, d] == 0:
                        fix = fix + (current[src] - corrupted[src])
                if deltas is not None:
                    deltas[dst] = torch.zeros(act.shape[:2] + act.shape[-1:], dtype=act.dtype, requires_grad=True)
                    fix = fix - deltas[dst]
                if head is None:
                    act = act - fix
                else:
                    act[:, :, head] = act[:, :, head] - fix
            return act
        return fn

    src_hooks = ["blocks.0.hook_resid_pre"] + [f"blocks.{lay}.attn.hook_result" for lay in range(m.cfg.n_layers)]
    src_hooks += [] if m.cfg.attn_only else [f"blocks.{lay}.hook_mlp_out" for lay in range(m.cfg.n_layers)]
    fwd = [(h, keep) for h in src_hooks] + [(name, patch(dests)) for name, dests in _dest_hooks(m)]
    return m.run_with_hooks(tokens, fwd_hooks=fwd)


def source_values(m: HookedTransformer, tokens: Tensor) -> dict[str, Tensor]:
    _, cache = m.run_with_cache(tokens)
    return sources_of(m, cache)


def value(m: HookedTransformer, pairs: PromptPairs, M: Tensor, corrupted: dict, graph: Graph,
          metric: str = "logit_diff") -> Tensor:
    logits = run(m, pairs.clean, M, corrupted, graph)
    return METRICS[metric](logits[torch.arange(pairs.batch_size), pairs.answer_pos], pairs).mean()


def eap(m: HookedTransformer, pairs: PromptPairs, graph: Graph, metric: str = "logit_diff") -> Tensor:
    """(corrupted - clean source) . d metric / d (destination input), one requires_grad leaf per destination."""
    with torch.no_grad():
        corr, clean = source_values(m, pairs.corrupted), source_values(m, pairs.clean)
    deltas: dict = {}
    logits = run(m, pairs.clean, graph.allowed.double(), corr, graph, deltas)
    val = METRICS[metric](logits[torch.arange(pairs.batch_size), pairs.answer_pos], pairs).mean()
    names = list(deltas)
    grads = dict(zip(names, torch.autograd.grad(val, [deltas[n] for n in names]), strict=True))
    scores = torch.zeros(graph.allowed.shape, dtype=torch.float64)
    for s, src in enumerate(graph.sources):
        for d, dst in enumerate(graph.dests):
            if graph.allowed[s, d]:
                scores[s, d] = ((corr[src] - clean[src]) * grads[dst]).sum().item()
    return scores


@torch.no_grad()
def acdc(m: HookedTransformer, pairs: PromptPairs, graph: Graph, threshold: float,
         metric: str = "logit_diff") -> tuple[Tensor, Tensor]:
    """The ACDC loop with one full forward per candidate edge (|metric change| < threshold: removed)."""
    corr = source_values(m, pairs.corrupted)
    M = graph.allowed.double().clone()
    current = float(value(m, pairs, M, corr, graph, metric))
    scores = torch.zeros(graph.allowed.shape, dtype=torch.float64)
    for d in reversed(range(len(graph.dests))):
        for s in reversed(range(len(graph.sources))):
            if not graph.allowed[s, d]:
                continue
            M[s, d] = 0
            new = float(value(m, pairs, M, corr, graph, metric))
            scores[s, d] = abs(new - current)
            if scores[s, d] < threshold:
                current = new
            else:
                M[s, d] = 1
    return M.bool() & graph.allowed, scores
