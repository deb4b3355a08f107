"""Patching metrics: functions of the logits at each prompt's answer position, one value per prompt
(``logit_diff``, ``loss``, ``accuracy``), and their normalisation (0 = corrupted, 1 = clean).
Definitions: docs/analyses.md, "Patching metrics"."""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from toylens.analyze.pairs import PAD, PromptPairs

Metric = Callable[[Tensor, PromptPairs], Tensor]


class MetricError(ValueError):
    """A metric name, value or input that cannot be used; the message names the fix."""


def at_answer(logits: Float[Tensor, "batch pos d_vocab"], pairs: PromptPairs) -> Float[Tensor, "batch d_vocab"]:
    """The logits at each prompt's ``answer_pos``."""
    if logits.ndim != 3 or logits.shape[0] != pairs.batch_size:
        raise MetricError(f"logits: shape {tuple(logits.shape)}, expected ({pairs.batch_size}, pos, d_vocab)")
    return logits[torch.arange(pairs.batch_size, device=logits.device), pairs.answer_pos.to(logits.device)]


def _check(logits: Tensor, pairs: PromptPairs) -> None:
    if logits.ndim != 2 or logits.shape[0] != pairs.batch_size:
        raise MetricError(f"logits_at_answer: shape {tuple(logits.shape)}, expected ({pairs.batch_size}, d_vocab); "
                          "pass the logits at answer_pos only (see metrics.at_answer)")


def _answer_logits(logits: Tensor, answers: Tensor) -> Tensor:
    """``logits[b, answers[b, ...]]`` with padded slots read as token 0 (callers mask them)."""
    flat = answers.clamp_min(0).reshape(answers.shape[0], -1)
    return logits.gather(-1, flat).reshape(answers.shape)


def logit_diff(logits_at_answer: Float[Tensor, "batch d_vocab"], pairs: PromptPairs) -> Float[Tensor, " batch"]:
    """Correct minus incorrect logit per prompt, averaged over the answer slots where both are given."""
    _check(logits_at_answer, pairs)
    answers = pairs.answers.to(logits_at_answer.device)
    picked = _answer_logits(logits_at_answer, answers)  # [batch, 2, k]
    mask = (answers[:, 0] != PAD) & (answers[:, 1] != PAD)
    diff = torch.where(mask, picked[:, 0] - picked[:, 1], 0.0)
    return diff.sum(-1) / mask.sum(-1).to(diff.dtype)


def answer_loss(logits_at_answer: Float[Tensor, "batch d_vocab"], pairs: PromptPairs) -> Float[Tensor, " batch"]:
    """Cross-entropy of the correct answer tokens at ``answer_pos``, mean over the non-padded slots."""
    _check(logits_at_answer, pairs)
    correct = pairs.answers[:, 0].to(logits_at_answer.device)  # [batch, k]
    logp = logits_at_answer.log_softmax(-1).gather(-1, correct.clamp_min(0))
    mask = correct != PAD
    return -torch.where(mask, logp, 0.0).sum(-1) / mask.sum(-1).to(logp.dtype)


def answer_accuracy(logits_at_answer: Float[Tensor, "batch d_vocab"], pairs: PromptPairs) -> Float[Tensor, " batch"]:
    """1.0 where the argmax at ``answer_pos`` is the first correct token, else 0.0."""
    _check(logits_at_answer, pairs)
    correct = pairs.answers[:, 0, 0].to(logits_at_answer.device)
    return (logits_at_answer.argmax(-1) == correct).to(logits_at_answer.dtype)


def normalized(metric_value, clean_value, corrupted_value):
    """``(value - corrupted) / (clean - corrupted)``: 0 = corrupted, 1 = clean (seed 003)."""
    denom = clean_value - corrupted_value
    if float(denom) == 0.0:
        raise MetricError(f"normalized: clean and corrupted metric are equal ({float(clean_value):.6g}), so the "
                          "normalised metric is undefined; use normalize=False or prompts the model tells apart")
    return (metric_value - corrupted_value) / denom


METRICS: dict[str, Metric] = {"logit_diff": logit_diff, "loss": answer_loss, "accuracy": answer_accuracy}
# Metrics that read only the answer tokens' logits: an engine may unembed just those columns.
READS_ONLY_ANSWERS = frozenset({logit_diff})


def get_metric(metric: str | Metric) -> Metric:
    """A metric by name (``logit_diff``, ``loss``, ``accuracy``), or a callable
    ``(logits_at_answer, pairs) -> [batch]`` passed through."""
    if callable(metric):
        return metric
    if metric not in METRICS:
        raise MetricError(f"metric={metric!r} is unknown; choose from {sorted(METRICS)} or pass a callable "
                          "(logits_at_answer [batch, d_vocab], pairs) -> [batch]")
    return METRICS[metric]


def metric_name(metric: str | Metric) -> str:
    return metric if isinstance(metric, str) else getattr(metric, "__name__", type(metric).__name__)


def tl_metric(metric: str | Metric, pairs: PromptPairs, clean_value: float | None = None,
              corrupted_value: float | None = None) -> Callable[[Tensor], Tensor]:
    """The scalar ``patching_metric`` of ``transformer_lens.patching`` for ``metric``: the mean over
    prompts at ``answer_pos``, normalised when both baselines are given."""
    fn = get_metric(metric)

    def patching_metric(logits: Float[Tensor, "batch pos d_vocab"]) -> Tensor:
        value = fn(at_answer(logits, pairs), pairs).mean()
        if clean_value is not None and corrupted_value is not None:
            value = normalized(value, clean_value, corrupted_value)
        return value

    return patching_metric
