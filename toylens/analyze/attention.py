"""Mean attention patterns and head-type scores, on integer tokens (no tokenizer anywhere).

Patterns are read with hooks on ``blocks.{layer}.attn.hook_pattern`` only, chunk by chunk, so a
large batch never holds more than one chunk of patterns (no full ``run_with_cache``).

Head-type scores (each in [0, 1]: a score sums attention weights, and a row of a pattern sums to
1; each is a mean over the queries where it is defined, over all rows of the batch):

- ``previous_token``: attention from ``query_pos`` to ``key_pos = query_pos - 1``, queries >= 1.
- ``current_token``: attention to ``key_pos = query_pos`` (the diagonal), queries >= 1.
- ``first_token``: attention to ``key_pos = 0`` (BOS when the task has one), queries >= 1.
  (Query 0 can only attend to itself, so it would count 1 for every head in both.)
- ``duplicate_token``: total attention to earlier key positions (``key_pos < query_pos``) that
  hold the same token id as the query, over queries that have at least one such earlier duplicate.
- ``induction``: total attention to key positions right after an earlier occurrence of the
  query's token, ``key_pos = j + 1`` with ``tokens[j] == tokens[query_pos]`` and
  ``key_pos < query_pos`` (strictly earlier, so the query itself never counts), over queries that
  have at least one such key.

Positional shortcuts: ``offset_attention[layer, head, d]`` is the mean attention from each scored
query (the task's loss-masked positions; every query >= 1 without a mask) to ``key_pos = query_pos - d``.
A head that puts at least ``FIXED_OFFSET_MIN`` of it on one offset attends by position, whatever the
tokens: when the task's layout puts (say) the induction key at that same offset, the head's
induction score measures the layout, not token content (``fixed_offsets`` says which heads).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from toylens._compat import HookedTransformer
from toylens.analyze import plots
from toylens.data.base import Batch
from toylens.result import Result

SCORE_NAMES = ("previous_token", "current_token", "first_token", "duplicate_token", "induction")
CONTENT_SCORES = ("duplicate_token", "induction")  # defined by token content, not by position
FIXED_OFFSET_MIN = 0.5  # share of a head's attention on one relative offset that makes it positional


def offset_sums(pattern: Float[Tensor, "batch head_index query_pos key_pos"],
                weights: Float[Tensor, "batch query_pos"]) -> Float[Tensor, "head_index offset"]:
    """``sum over rows and queries of weights[r, q] * pattern[r, h, q, q - d]`` for every offset d."""
    n = pattern.shape[-1]
    out = pattern.new_zeros(pattern.shape[1], n)
    for d in range(n):
        diag = torch.diagonal(pattern, offset=-d, dim1=2, dim2=3)  # [batch, head, n - d]: queries d..n-1
        out[:, d] = (diag * weights[:, None, d:]).sum(dim=(0, 2))
    return out


def score_masks(tokens: Int[Tensor, "batch pos"]) -> dict[str, Tensor]:
    """For each score, a bool mask ``[batch, query_pos, key_pos]`` of the keys whose attention counts."""
    b, n = tokens.shape
    q = torch.arange(n, device=tokens.device)[:, None]
    k = torch.arange(n, device=tokens.device)[None, :]
    earlier = (k < q)[None].expand(b, n, n)
    same = tokens[:, :, None] == tokens[:, None, :]  # [batch, query_pos, key_pos]
    prev_tok = torch.cat([tokens.new_full((b, 1), -1), tokens[:, :-1]], dim=1)  # token at key_pos - 1
    after_same = (tokens[:, :, None] == prev_tok[:, None, :]) & (k >= 1)
    return {
        "previous_token": (k == q - 1)[None].expand(b, n, n),
        "current_token": ((k == q) & (q >= 1))[None].expand(b, n, n),
        "first_token": ((k == 0) & (q >= 1))[None].expand(b, n, n),
        "duplicate_token": same & earlier,
        "induction": after_same & earlier,
    }


def head_score_sums(pattern: Float[Tensor, "batch head_index query_pos key_pos"],
                    tokens: Int[Tensor, "batch pos"],
                    masks: dict[str, Tensor] | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Per score: (sum over counted queries of attention on the counted keys ``[head_index]``,
    number of counted queries). Chunks add up; ``score = sum / count``. ``masks`` are
    ``score_masks(tokens)``, passed in to compute them once for all layers."""
    masks = score_masks(tokens) if masks is None else masks
    out = {}
    for name, mask in masks.items():
        counted = mask.any(-1)  # [batch, query_pos]: queries where the score is defined
        attn = (pattern * mask[:, None].to(pattern.dtype)).sum(-1)  # [batch, head_index, query_pos]
        total = (attn * counted[:, None].to(pattern.dtype)).sum(dim=(0, 2))
        out[name] = (total, counted.sum().to(pattern.dtype))
    return out


def head_scores(pattern: Float[Tensor, "batch head_index query_pos key_pos"],
                tokens: Int[Tensor, "batch pos"]) -> dict[str, Float[Tensor, " head_index"]]:
    """Head-type scores of one layer's patterns (NaN where no query qualifies, e.g. no duplicates)."""
    return {name: s / c if c > 0 else torch.full_like(s, float("nan"))
            for name, (s, c) in head_score_sums(pattern, tokens).items()}


@dataclass
class AttentionResult(Result):
    """Mean attention per head and head-type scores.

    ``mean_pattern``: ``[layer, head_index, query_pos, key_pos]``, averaged over batch rows.
    ``scores``: score name -> ``[layer, head_index]`` in [0, 1] (NaN: no qualifying query).
    ``head_labels``: ``L{layer}H{head}`` in ``[layer, head_index]`` row-major order.
    """

    mean_pattern: Float[Tensor, "layer head_index query_pos key_pos"]
    scores: dict[str, Float[Tensor, "layer head_index"]]
    head_labels: list[str]
    n_rows: int
    score_counts: dict[str, int] = field(default_factory=dict)
    offset_attention: Float[Tensor, "layer head_index offset"] | None = None

    def fixed_offsets(self, min_share: float = FIXED_OFFSET_MIN) -> dict[str, dict]:
        """Heads whose attention sits on one relative offset: label -> {offset, share} (share >= min_share)."""
        if self.offset_attention is None:
            return {}
        share, offset = self.offset_attention.reshape(len(self.head_labels), -1).max(-1)
        return {label: {"offset": int(offset[i]), "share": float(share[i])}
                for i, label in enumerate(self.head_labels) if float(share[i]) >= min_share}

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["scores_by_head"] = {
            label: {name: float(s.reshape(-1)[i]) for name, s in self.scores.items()}
            for i, label in enumerate(self.head_labels)}
        d["fixed_offsets"] = self.fixed_offsets()
        return d

    def figures(self) -> dict:
        figs = {}
        n_layers, n_heads, n_pos, _ = self.mean_pattern.shape
        pos = [str(i) for i in range(n_pos)]
        for layer in range(n_layers):
            for head in range(n_heads):
                figs[f"attention/L{layer}H{head}"] = plots.heatmap(
                    self.mean_pattern[layer, head], x_labels=pos, y_labels=pos, diverging=False,
                    zmin=0.0, zmax=1.0, title=f"L{layer}H{head} mean attention pattern",
                    xaxis="key_pos", yaxis="query_pos")
            figs[f"attention/layer{layer}_mean"] = plots.heatmap(
                self.mean_pattern[layer].mean(0), x_labels=pos, y_labels=pos, diverging=False,
                zmin=0.0, zmax=1.0, title=f"Layer {layer} attention, mean over heads",
                xaxis="key_pos", yaxis="query_pos")
        table = torch.stack([self.scores[n].reshape(-1) for n in SCORE_NAMES])
        figs["attention/head_scores"] = plots.heatmap(
            table, x_labels=self.head_labels, y_labels=list(SCORE_NAMES), diverging=False,
            zmin=0.0, zmax=1.0, title="Head-type scores", xaxis="head", yaxis="score")
        return figs


@torch.no_grad()
def attention_patterns(model: HookedTransformer, batch: Batch | Int[Tensor, "batch pos"],
                       chunk_size: int = 250, progress: bool = False) -> AttentionResult:
    """Mean attention pattern per head and head-type scores over ``batch`` (every row, every query),
    and each head's attention per relative offset over the scored queries (``batch.loss_mask``)."""
    tokens = batch.tokens if isinstance(batch, Batch) else batch
    tokens = tokens.to(model.cfg.device)
    if isinstance(batch, Batch) and bool(batch.loss_mask.any()):
        weights = batch.loss_mask.to(tokens.device, torch.float32)
    else:
        weights = torch.ones(tokens.shape, device=tokens.device)
        weights[:, 0] = 0.0  # query 0 can only attend to itself
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    n_rows, n_pos = tokens.shape
    pattern_sum = torch.zeros(n_layers, n_heads, n_pos, n_pos, device=tokens.device)
    sums = {name: torch.zeros(n_layers, n_heads, device=tokens.device) for name in SCORE_NAMES}
    counts = {name: torch.zeros(n_layers, device=tokens.device) for name in SCORE_NAMES}
    offsets = torch.zeros(n_layers, n_heads, n_pos, device=tokens.device)

    for start in tqdm(range(0, n_rows, chunk_size), disable=not progress, desc="attention"):
        rows = tokens[start:start + chunk_size]
        masks = score_masks(rows)
        w = weights[start:start + chunk_size]

        def hook(pattern, hook, rows=rows, masks=masks, w=w):
            layer = hook.layer()
            pattern = pattern.float()
            pattern_sum[layer] += pattern.sum(0)
            offsets[layer] += offset_sums(pattern, w)
            for name, (s, c) in head_score_sums(pattern, rows, masks).items():
                sums[name][layer] += s
                counts[name][layer] += c

        hooks = [(f"blocks.{layer}.attn.hook_pattern", hook) for layer in range(n_layers)]
        model.run_with_hooks(rows, fwd_hooks=hooks, stop_at_layer=n_layers)

    scores = {name: torch.where(counts[name][:, None] > 0, sums[name] / counts[name][:, None].clamp(min=1),
                                torch.full_like(sums[name], float("nan")))
              for name in SCORE_NAMES}
    return AttentionResult(
        mean_pattern=(pattern_sum / n_rows).cpu(),
        scores={k: v.cpu() for k, v in scores.items()},
        head_labels=[f"L{layer}H{head}" for layer in range(n_layers) for head in range(n_heads)],
        n_rows=n_rows,
        score_counts={name: int(counts[name][0]) for name in SCORE_NAMES},
        offset_attention=(offsets / weights.sum().clamp(min=1)).cpu(),
    )


def shuffle_tokens(batch: Batch, seed: int = 0) -> Batch:
    """``batch`` with positions 1.. of each row permuted at random (position 0, the layout and the loss
    mask kept): repeats and other token structure are gone, positions are not."""
    gen = torch.Generator().manual_seed(seed)
    b, n = batch.tokens.shape
    perm = torch.rand(b, n - 1, generator=gen).argsort(-1).to(batch.tokens.device) + 1
    tokens = torch.cat([batch.tokens[:, :1], batch.tokens.gather(1, perm)], dim=1)
    return Batch(tokens, batch.targets, batch.loss_mask)


def positional_shortcuts(model: HookedTransformer, batch: Batch, result: AttentionResult, chunk_size: int = 250,
                         progress: bool = False, seed: int = 0) -> dict[str, dict]:
    """The heads of ``result.fixed_offsets()`` that keep the same offset when the tokens are shuffled
    (``shuffle_tokens``): their attention is explained by position, not token content.

    label -> {offset, share, share_shuffled}; a head that loses its offset without the token structure
    (a real induction head, say) is not listed.
    """
    fixed = result.fixed_offsets()
    if not fixed:
        return {}
    control = attention_patterns(model, shuffle_tokens(batch, seed), chunk_size=chunk_size, progress=progress)
    again = control.fixed_offsets()
    return {label: {**f, "share_shuffled": again[label]["share"]}
            for label, f in fixed.items() if label in again and again[label]["offset"] == f["offset"]}
