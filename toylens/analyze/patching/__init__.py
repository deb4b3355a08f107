"""Activation patching sweeps with ``transformer_lens.patching``'s shapes and semantics, on one batched engine:

    result = patch(model, pairs, "resid_pre")            # [layer, pos], 0 = corrupted, 1 = clean

Kinds, metrics and where the speed comes from: docs/analyses.md, "Activation patching"."""

from __future__ import annotations

import dataclasses

import numpy as np
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor

from toylens._compat import HookedTransformer
from toylens.analyze import plots
from toylens.analyze.metrics import Metric, get_metric, metric_name, normalized
from toylens.analyze.pairs import PromptPairs
from toylens.analyze.patching.engine import KINDS, Context, Kind, PatchingError, n_heads_for, run_sweep
from toylens.result import Result

__all__ = ["ALL_KINDS", "EVERY", "KINDS", "PatchingError", "PatchingResult", "patch", "patch_attn_out",
           "patch_block_every", "patch_head_all_pos_every", "patch_head_by_pos_every", "patch_mlp_out",
           "patch_resid_mid", "patch_resid_post", "patch_resid_pre", "patching_context", "scatter", "value_at"]

EVERY: dict[str, tuple[str, ...]] = {
    "block_every": ("resid_pre", "attn_out", "mlp_out"),
    "attn_head_all_pos_every": ("z_all_pos", "q_all_pos", "k_all_pos", "v_all_pos", "pattern_all_pos"),
    "attn_head_by_pos_every": ("z_by_pos", "q_by_pos", "k_by_pos", "v_by_pos", "pattern_by_pos"),
}
TL_EVERY = {"block_every": "get_act_patch_block_every",
            "attn_head_all_pos_every": "get_act_patch_attn_head_all_pos_every",
            "attn_head_by_pos_every": "get_act_patch_attn_head_by_pos_every"}
ALL_KINDS = (*KINDS, *EVERY)


@dataclasses.dataclass
class PatchingResult(Result):
    """A sweep's values (mean metric over prompts per patch) with named, labelled axes.

    ``values`` has one axis per name in ``dims`` (TransformerLens's output order) and ``labels``
    gives each axis's tick labels (positions from ``pairs.labels()``, heads ``H{h}``, patch types).
    ``clean_value`` and ``corrupted_value`` are the unpatched runs' raw metric; with
    ``normalized`` the values are ``(metric - corrupted) / (clean - corrupted)``.
    """

    kind: str
    metric: str
    normalized: bool
    values: Tensor
    dims: list[str]
    labels: dict[str, list[str]]
    clean_value: float
    corrupted_value: float
    n_prompts: int
    tl_function: str
    method: str = "activation patching"  # or "attribution patching" (first-order estimate)

    @property
    def _prefix(self) -> str:
        return "patching" if self.method == "activation patching" else "attribution"

    def raw(self) -> Tensor:
        """The values as raw metric (undoing the normalisation)."""
        if not self.normalized:
            return self.values
        return self.values * (self.clean_value - self.corrupted_value) + self.corrupted_value

    def sub(self, patch_type: str) -> PatchingResult:
        """One patch type of an ``*_every`` result, as a result of that kind."""
        if self.dims[0] != "patch_type":
            raise PatchingError(f"sub({patch_type!r}): {self.kind} has no patch_type axis")
        types = self.labels["patch_type"]
        if patch_type not in types:
            raise PatchingError(f"sub({patch_type!r}): choose from {types}")
        i = types.index(patch_type)
        values, dims = self.values[i], self.dims[1:]
        if self.kind == "attn_head_by_pos_every" and patch_type == "pattern_by_pos":
            values, dims = values.permute(0, 2, 1), ["layer", "head_index", "dest_pos"]
            labels = {"layer": self.labels["layer"], "head_index": self.labels["head_index"],
                      "dest_pos": self.labels["pos"]}
        else:
            labels = {d: self.labels[d] for d in dims}
        return dataclasses.replace(self, kind=patch_type, values=values, dims=list(dims), labels=labels,
                                   tl_function=KINDS[patch_type].tl_function)

    def figures(self) -> dict:
        if self.dims[0] == "patch_type":
            figs = {}
            for t in self.labels["patch_type"]:
                figs.update(self.sub(t).figures())
            if self.kind == "attn_head_all_pos_every":
                z = self.sub("z_all_pos")
                figs[f"{self._prefix}/{self.kind}/value_vs_output"] = scatter(self.sub("v_all_pos"), z)
                figs[f"{self._prefix}/{self.kind}/pattern_vs_output"] = scatter(self.sub("pattern_all_pos"), z)
            return figs
        scale = "normalised, 0 = corrupted, 1 = clean" if self.normalized else "raw"
        title = f"{self.method.capitalize()}, {self.kind}: {self.metric} ({scale})"
        v, dims, lab = self.values, self.dims, self.labels
        if dims in (["layer", "pos"], ["layer", "head_index"]):
            fig = plots.heatmap(v, x_labels=lab[dims[1]], y_labels=lab["layer"], title=title,
                                xaxis=dims[1], yaxis="layer")
            return {f"{self._prefix}/{self.kind}": fig}
        heads = _head_labels(v.shape[0], v.shape[2] if dims[1] == "pos" else v.shape[1])
        if dims == ["layer", "pos", "head_index"]:
            rows = v.permute(0, 2, 1).reshape(-1, v.shape[1])
            fig = plots.heatmap(rows, x_labels=lab["pos"], y_labels=heads, title=title, xaxis="pos", yaxis="head")
            return {f"{self._prefix}/{self.kind}": fig}
        if dims == ["layer", "head_index", "dest_pos"]:
            fig = plots.heatmap(v.reshape(-1, v.shape[2]), x_labels=lab["dest_pos"], y_labels=heads, title=title,
                                xaxis="dest_pos", yaxis="head")
            return {f"{self._prefix}/{self.kind}": fig}
        # [layer, head_index, dest_pos, src_pos]: the heads with the largest effect
        flat = v.reshape(-1, v.shape[2], v.shape[3])
        top = torch.argsort(flat.abs().amax((1, 2)), descending=True)[:6].tolist()
        return {f"{self._prefix}/{self.kind}/{heads[i]}": plots.heatmap(
            flat[i], x_labels=lab["src_pos"], y_labels=lab["dest_pos"], title=f"{title}, {heads[i]}",
            xaxis="src_pos", yaxis="dest_pos") for i in top}


def _head_labels(n_layers: int, n_heads: int) -> list[str]:
    return [f"L{layer}H{head}" for layer in range(n_layers) for head in range(n_heads)]


def scatter(x: PatchingResult, y: PatchingResult) -> go.Figure:
    """Seed 003's scatter of two all-position head sweeps (e.g. value vs output), coloured by layer."""
    if x.dims != ["layer", "head_index"] or y.dims != ["layer", "head_index"] or x.values.shape != y.values.shape:
        raise PatchingError(f"scatter needs two [layer, head_index] results of one shape, got {x.kind} "
                            f"{tuple(x.values.shape)} and {y.kind} {tuple(y.values.shape)}")
    n_layers, n_heads = x.values.shape
    layer = np.repeat(np.arange(n_layers), n_heads)
    fig = go.Figure(go.Scatter(
        x=plots.to_numpy(x.values).reshape(-1), y=plots.to_numpy(y.values).reshape(-1), mode="markers",
        text=_head_labels(n_layers, n_heads), hovertemplate="%{text}: (%{x:.3f}, %{y:.3f})<extra></extra>",
        marker={"color": layer, "colorscale": "Viridis", "colorbar": {"title": "Layer"}}))
    fig.update_layout(title=f"{y.kind} vs {x.kind} patching ({x.metric})", xaxis_title=x.kind, yaxis_title=y.kind)
    return fig


def patching_context(model: HookedTransformer, pairs: PromptPairs, metric: str | Metric = "logit_diff",
                     engine: str = "auto") -> Context:
    """The cached clean and corrupted runs several sweeps can share (pass as ``context=``)."""
    if not isinstance(pairs, PromptPairs):
        raise PatchingError(f"pairs: expected a PromptPairs, got {type(pairs).__name__}; build one with "
                            "toylens.analyze.pairs.PromptPairs(clean, corrupted, answer_pos, answers)")
    if pairs.n_pos > model.cfg.n_ctx:
        raise PatchingError(f"pairs: {pairs.n_pos} positions exceed the model's n_ctx={model.cfg.n_ctx}; "
                            "use shorter prompts")
    if int(pairs.answers.max()) >= model.cfg.d_vocab_out or int(pairs.clean.max()) >= model.cfg.d_vocab:
        raise PatchingError(f"pairs: token ids beyond the model's vocabulary (d_vocab={model.cfg.d_vocab})")
    return Context(model, pairs, get_metric(metric), engine)


def patch(model: HookedTransformer, pairs: PromptPairs, kind: str, metric: str | Metric = "logit_diff", *,
          normalize: bool = True, chunk_budget_mb: float = 64, progress: bool = True, engine: str = "auto",
          workers: int | None = None, context: Context | None = None) -> PatchingResult:
    """Activation patching sweep ``kind`` (see the module doc) of ``pairs``: clean into corrupted.

    ``metric``: ``"logit_diff"``, ``"loss"``, ``"accuracy"`` or a callable
    ``(logits_at_answer [batch, d_vocab], pairs) -> [batch]``; ``chunk_budget_mb`` bounds the
    memory of one stacked chunk; ``engine="hooks"`` forces the TransformerLens-blocks path (the
    default uses it only for architectures the fast path does not cover); ``context`` reuses the
    cached runs of ``patching_context`` for several sweeps; ``workers`` threads run chunks on CPU
    (default: torch's thread count up to 4; torch runs single-threaded in each).
    """
    if kind not in ALL_KINDS:
        raise PatchingError(f"kind={kind!r} is unknown; choose from {list(ALL_KINDS)}")
    if chunk_budget_mb <= 0:
        raise PatchingError(f"chunk_budget_mb={chunk_budget_mb} must be positive")
    if context is None:
        context = patching_context(model, pairs, metric, engine)
    elif context.model is not model or context.b != pairs.batch_size or not all(
            torch.equal(getattr(context.pairs, f).cpu(), getattr(pairs, f).cpu())
            for f in ("clean", "corrupted", "answer_pos", "answers")):
        raise PatchingError("context: built for another model or other pairs; build it with "
                            "patching_context(model, pairs, metric)")
    elif context.metric is not get_metric(metric):
        raise PatchingError("context: built for another metric; pass the same metric or a new context")
    ctx = context
    parts = EVERY.get(kind, (kind,))
    kinds: list[Kind] = [KINDS[p] for p in parts]
    ctx.prepare(kinds)
    budget = int(chunk_budget_mb * 2**20)
    n_workers = max(1, min(torch.get_num_threads(), 4) if workers is None else int(workers))
    clean_value, corrupted_value = float(ctx.clean_rows.mean()), float(ctx.corr_rows.mean())

    def one(k: Kind) -> Tensor:
        raw = run_sweep(ctx, k, budget, progress, n_workers)
        return normalized(raw, clean_value, corrupted_value) if normalize else raw

    pos_labels = pairs.labels()
    n_heads = model.cfg.n_heads
    labels = {"layer": [str(layer) for layer in range(model.cfg.n_layers)], "pos": pos_labels,
              "dest_pos": pos_labels, "src_pos": pos_labels}
    if kind in EVERY:
        values = [one(k) for k in kinds]
        if kind == "attn_head_by_pos_every":
            values[-1] = values[-1].permute(0, 2, 1)  # pattern [layer, head, dest] -> [layer, pos, head]
        if kind != "block_every":  # k, v under grouped-query attention: zero-padded to n_heads, as TL does
            values = [torch.nn.functional.pad(t, (0, n_heads - t.shape[-1])) for t in values]
        dims = ["patch_type", *kinds[0].axes]
        labels["patch_type"] = list(parts)
        labels["head_index"] = [f"H{h}" for h in range(n_heads)]
        values_t = torch.stack(values)
        tl = TL_EVERY[kind]
    else:
        values_t = one(kinds[0])
        dims = list(kinds[0].axes)
        labels["head_index"] = [f"H{h}" for h in range(n_heads_for(model, kinds[0].act))]
        tl = kinds[0].tl_function
    return PatchingResult(kind=kind, metric=metric_name(metric), normalized=normalize, values=values_t.cpu(),
                          dims=dims, labels={d: labels[d] for d in dims}, clean_value=clean_value,
                          corrupted_value=corrupted_value, n_prompts=pairs.batch_size, tl_function=tl)


def _specialise(kind: str):
    def sweep(model: HookedTransformer, pairs: PromptPairs, metric: str | Metric = "logit_diff",
              **kwargs) -> PatchingResult:
        return patch(model, pairs, kind, metric, **kwargs)

    sweep.__name__ = sweep.__qualname__ = f"patch_{kind}"
    sweep.__doc__ = f"``patch(model, pairs, {kind!r}, metric, **kwargs)``."
    return sweep


patch_resid_pre = _specialise("resid_pre")
patch_resid_mid = _specialise("resid_mid")
patch_resid_post = _specialise("resid_post")
patch_attn_out = _specialise("attn_out")
patch_mlp_out = _specialise("mlp_out")
patch_head_all_pos_every = _specialise("attn_head_all_pos_every")
patch_head_by_pos_every = _specialise("attn_head_by_pos_every")
patch_block_every = _specialise("block_every")


def value_at(result: PatchingResult, **index: int) -> Float[Tensor, ""]:
    """``result.values`` at named indices, e.g. ``value_at(r, layer=1, pos=3)``."""
    unknown = set(index) - set(result.dims)
    if unknown:
        raise PatchingError(f"value_at: {sorted(unknown)} not among the dims {result.dims}")
    return result.values[tuple(index.get(d, slice(None)) for d in result.dims)]
