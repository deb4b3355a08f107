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

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["scores_by_head"] = {
            label: {name: float(s.reshape(-1)[i]) for name, s in self.scores.items()}
            for i, label in enumerate(self.head_labels)}
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
    """Mean attention pattern per head and head-type scores over ``batch`` (every row, every query)."""
    tokens = batch.tokens if isinstance(batch, Batch) else batch
    tokens = tokens.to(model.cfg.device)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    n_rows, n_pos = tokens.shape
    pattern_sum = torch.zeros(n_layers, n_heads, n_pos, n_pos, device=tokens.device)
    sums = {name: torch.zeros(n_layers, n_heads, device=tokens.device) for name in SCORE_NAMES}
    counts = {name: torch.zeros(n_layers, device=tokens.device) for name in SCORE_NAMES}

    for start in tqdm(range(0, n_rows, chunk_size), disable=not progress, desc="attention"):
        rows = tokens[start:start + chunk_size]
        masks = score_masks(rows)

        def hook(pattern, hook, rows=rows, masks=masks):
            layer = hook.layer()
            pattern = pattern.float()
            pattern_sum[layer] += pattern.sum(0)
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
    )
