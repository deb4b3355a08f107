"""MLP neuron activity: how often each neuron fires at each position, its mean activation, and
which neurons never fire on the batch (dead).

"Active" means ``blocks.{layer}.mlp.hook_post > threshold``. The default threshold is 0 for
``relu`` (the notebook's ``(post > 0).float().mean(0)``) and ``GELU_LIKE_THRESHOLD`` for every other
activation (gelu, gelu_new, silu, solu_ln, ...): those are positive for any positive input, so
"> 0" would count neurons that barely pass a tiny value as firing. Activations are read with hooks
on ``hook_post`` only, chunk by chunk, and the forward pass stops after the last MLP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from toylens._compat import HookedTransformer
from toylens.analyze import plots
from toylens.data.base import Batch
from toylens.result import Result, jsonable

GELU_LIKE_THRESHOLD = 1e-2


def default_threshold(act_fn: str | None) -> float:
    """0 for relu, ``GELU_LIKE_THRESHOLD`` for smooth activations (gelu, silu, solu, ...)."""
    return 0.0 if act_fn == "relu" else GELU_LIKE_THRESHOLD


@dataclass
class NeuronResult(Result):
    """Neuron activity per MLP layer (empty tensors, ``layers == []``, for attn-only models).

    ``frequency``: fraction of batch rows with ``hook_post > threshold``, ``[layer, pos, d_mlp]``.
    ``mean_activation``: mean of ``hook_post`` over batch rows, ``[layer, pos, d_mlp]``.
    ``dead``: ``[layer, d_mlp]``, True for neurons active at no row and no position of the batch.
    ``n_dead``: dead neurons per layer.
    """

    frequency: Float[Tensor, "layer pos d_mlp"]
    mean_activation: Float[Tensor, "layer pos d_mlp"]
    dead: Bool[Tensor, "layer d_mlp"]
    n_dead: list[int]
    layers: list[int]
    threshold: float
    act_fn: str | None
    n_rows: int

    def to_dict(self) -> dict:
        # The per-position maps go to figures; report.json keeps the per-neuron summary.
        return jsonable({
            "layers": self.layers, "threshold": self.threshold, "act_fn": self.act_fn,
            "n_rows": self.n_rows, "n_dead": self.n_dead,
            "dead_neurons": {f"blocks.{layer}.mlp": self.dead[i].nonzero().flatten().tolist()
                             for i, layer in enumerate(self.layers)},
            "frequency_mean": self.frequency.mean(dim=(1, 2)),
        })

    def figures(self) -> dict:
        figs = {}
        for i, layer in enumerate(self.layers):
            figs[f"neurons/layer{layer}_frequency"] = plots.heatmap(
                self.frequency[i], diverging=False, zmin=0.0, zmax=1.0, xaxis="neuron", yaxis="pos",
                title=f"Layer {layer}: fraction of rows with hook_post > {self.threshold:g}")
            figs[f"neurons/layer{layer}_mean_activation"] = plots.heatmap(
                self.mean_activation[i], xaxis="neuron", yaxis="pos",
                title=f"Layer {layer}: mean MLP activation (hook_post)")
        if self.layers:
            figs["neurons/dead"] = plots.bar(self.n_dead, labels=[f"layer {layer}" for layer in self.layers],
                                             title="Dead neurons (never active on the batch)",
                                             yaxis="neurons")
        return figs


@torch.no_grad()
def neuron_activity(model: HookedTransformer, batch: Batch | Int[Tensor, "batch pos"],
                    threshold: float | None = None, chunk_size: int = 250,
                    progress: bool = False) -> NeuronResult:
    """Activation frequency and mean activation per neuron and position, and dead neurons."""
    tokens = batch.tokens if isinstance(batch, Batch) else batch
    tokens = tokens.to(model.cfg.device)
    n_rows, n_pos = tokens.shape
    act_fn = model.cfg.act_fn
    thr = default_threshold(act_fn) if threshold is None else float(threshold)
    if model.cfg.attn_only:
        empty = torch.zeros(0, n_pos, 0)
        return NeuronResult(frequency=empty, mean_activation=empty.clone(),
                            dead=torch.zeros(0, 0, dtype=torch.bool), n_dead=[], layers=[],
                            threshold=thr, act_fn=act_fn, n_rows=n_rows)
    layers = list(range(model.cfg.n_layers))
    d_mlp = model.cfg.d_mlp
    active = torch.zeros(len(layers), n_pos, d_mlp, device=tokens.device)
    total = torch.zeros(len(layers), n_pos, d_mlp, device=tokens.device)

    def hook(post, hook):
        post = post.float()
        active[hook.layer()] += (post > thr).float().sum(0)
        total[hook.layer()] += post.sum(0)

    hooks = [(f"blocks.{layer}.mlp.hook_post", hook) for layer in layers]
    for start in tqdm(range(0, n_rows, chunk_size), disable=not progress, desc="neurons"):
        model.run_with_hooks(tokens[start:start + chunk_size], fwd_hooks=hooks, stop_at_layer=layers[-1] + 1)

    frequency = (active / n_rows).cpu()
    dead = (active.sum(1) == 0).cpu()
    return NeuronResult(frequency=frequency, mean_activation=(total / n_rows).cpu(), dead=dead,
                        n_dead=dead.sum(-1).tolist(), layers=layers, threshold=thr, act_fn=act_fn,
                        n_rows=n_rows)
