"""Attribution patching: a first-order estimate of every activation patching sweep from one clean
forward, one corrupted forward and one backward pass (Nanda). Details: docs/analyses.md."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from toylens._compat import HookedTransformer
from toylens.analyze.metrics import Metric, at_answer, get_metric, metric_name, normalized
from toylens.analyze.pairs import PromptPairs
from toylens.analyze.patching import EVERY, KINDS, PatchingResult, patching_context
from toylens.analyze.patching.engine import Kind, PatchingError, hook_name, n_heads_for
from toylens.result import Result

__all__ = ["AttributionResult", "attribution_patch", "correlation"]


@dataclasses.dataclass
class AttributionResult(Result):
    """One estimated sweep per kind (``results[kind]``), aligned with ``patch(model, pairs, kind)``."""

    results: dict[str, PatchingResult]
    metric: str
    normalized: bool
    clean_value: float
    corrupted_value: float

    def __getitem__(self, kind: str) -> PatchingResult:
        return self.results[kind]

    def figures(self) -> dict:
        figs = {}
        for r in self.results.values():
            figs.update(r.figures())
        return figs


def correlation(a: PatchingResult | Tensor, b: PatchingResult | Tensor) -> float:
    """Pearson correlation of two sweeps' values over all entries (NaN when either is constant)."""
    x = (a.values if isinstance(a, PatchingResult) else a).double().flatten()
    y = (b.values if isinstance(b, PatchingResult) else b).double().flatten()
    if x.shape != y.shape:
        raise PatchingError(f"correlation: {tuple(x.shape)} and {tuple(y.shape)} entries; compare the same kind")
    x, y = x - x.mean(), y - y.mean()
    denom = (x.norm() * y.norm()).item()
    return float((x @ y).item() / denom) if denom > 0 else float("nan")


def _estimate(kind: Kind, delta_grad: Tensor, n_pos: int) -> Tensor:
    """Sum (clean - corrupted) * grad over the prompts and the patched slice: ``[...]`` of one layer."""
    pad = n_pos - (delta_grad.shape[-1] if kind.act == "pattern" else delta_grad.shape[1])
    if kind.act == "pattern":  # [batch, head_index, dest_pos, src_pos]
        if kind.name == "pattern_all_pos":
            return delta_grad.sum((0, 2, 3))
        if kind.name == "pattern_by_pos":
            return F.pad(delta_grad.sum((0, 3)), (0, pad))
        return F.pad(delta_grad.sum(0), (0, pad, 0, pad))
    if kind.axes == ("layer", "pos"):  # [batch, pos, d_model]
        return F.pad(delta_grad.sum((0, 2)), (0, pad))
    if kind.all_pos:  # [batch, pos, head_index, d_head]
        return delta_grad.sum((0, 1, 3))
    return F.pad(delta_grad.sum((0, 3)), (0, 0, 0, pad))  # [pos, head_index]


def attribution_patch(model: HookedTransformer, pairs: PromptPairs, kinds: Sequence[str] | None = None,
                      metric: str | Metric = "logit_diff", *, normalize: bool = True) -> AttributionResult:
    """Attribution-patching estimates of the sweeps ``kinds`` (default: every kind the model has).

    ``kinds`` are names of ``toylens.analyze.patching`` (``*_every`` expands to its parts).
    """
    fn = get_metric(metric)
    ctx = patching_context(model, pairs, fn)  # validates pairs against the model
    pairs = ctx.pairs
    if kinds is None:
        kinds = [k for k, spec in KINDS.items()
                 if not (model.cfg.attn_only and spec.act in ("resid_mid", "mlp_out"))]
    names: list[str] = []
    for k in kinds:
        for part in EVERY.get(k, (k,)):
            if part not in KINDS:
                raise PatchingError(f"kinds: {k!r} is unknown; choose from {list(KINDS) + list(EVERY)}")
            if model.cfg.attn_only and KINDS[part].act in ("resid_mid", "mlp_out"):
                raise PatchingError(f"kinds: an attention-only model has no {KINDS[part].act}; drop {k!r}")
            names.append(part)
    names = list(dict.fromkeys(names))
    specs = [KINDS[k] for k in names]
    L, T = model.cfg.n_layers, ctx.T
    hooks = {hook_name(s.act, layer) for s in specs for layer in range(L)}

    with torch.inference_mode():
        clean_logits, clean_cache = model.run_with_cache(pairs.clean[:, :T], names_filter=lambda n: n in hooks)
        clean_value = fn(at_answer(clean_logits, pairs), pairs).mean().item()
    acts: dict[str, Tensor] = {}

    def keep(act: Tensor, hook) -> None:
        acts[hook.name] = act  # the last call wins, as in run_with_cache

    with torch.enable_grad():  # gradients of the activations only: the parameters' .grad stay untouched
        logits = model.run_with_hooks(pairs.corrupted[:, :T], fwd_hooks=[(lambda n: n in hooks, keep)])
        value = fn(at_answer(logits, pairs), pairs).mean()
        corrupted_value = value.item()
        names = list(acts)
        grads = torch.autograd.grad(value, [acts[n] for n in names], allow_unused=True)
    grad_of = {n: torch.zeros_like(acts[n]) if g is None else g for n, g in zip(names, grads, strict=True)}

    scale = 1.0 / (clean_value - corrupted_value) if normalize else 1.0
    if normalize:
        normalized(0.0, clean_value, corrupted_value)  # raises when the normalisation is undefined
    labels = {"layer": [str(layer) for layer in range(L)], "pos": pairs.labels(), "dest_pos": pairs.labels(),
              "src_pos": pairs.labels()}
    results: dict[str, PatchingResult] = {}
    with torch.no_grad():
        per_kind = {}
        for spec in specs:
            layers = []
            for layer in range(L):
                name = hook_name(spec.act, layer)
                delta_grad = (clean_cache[name] - acts[name].detach()) * grad_of[name]
                layers.append(_estimate(spec, delta_grad, pairs.n_pos))
            effect = torch.stack(layers).float()
            per_kind[spec.name] = effect * scale if normalize else effect + corrupted_value
        for k in kinds:
            parts = EVERY.get(k, (k,))
            if k in EVERY:
                n_heads = model.cfg.n_heads
                vals = [per_kind[p] for p in parts]
                if k == "attn_head_by_pos_every":
                    vals[-1] = vals[-1].permute(0, 2, 1)
                if k != "block_every":
                    # GQA k/v padded with 0 as TransformerLens does (in metric units, normalised or raw)
                    vals = [F.pad(t, (0, n_heads - t.shape[-1])) for t in vals]
                values, dims = torch.stack(vals), ["patch_type", *KINDS[parts[0]].axes]
                lab = dict(labels, patch_type=list(parts), head_index=[f"H{h}" for h in range(n_heads)])
            else:
                spec = KINDS[k]
                values, dims = per_kind[k], list(spec.axes)
                lab = dict(labels, head_index=[f"H{h}" for h in range(n_heads_for(model, spec.act))])
            results[k] = PatchingResult(kind=k, metric=metric_name(metric), normalized=normalize,
                                        values=values.cpu(), dims=dims, labels={d: lab[d] for d in dims},
                                        clean_value=clean_value, corrupted_value=corrupted_value,
                                        n_prompts=pairs.batch_size, tl_function="", method="attribution patching")
    return AttributionResult(results=results, metric=metric_name(metric), normalized=normalize,
                             clean_value=clean_value, corrupted_value=corrupted_value)
