"""Patching metrics: seed 003's logit difference, loss, accuracy, normalisation, and their errors."""

from __future__ import annotations

import math

import pytest
import torch

from toylens.analyze.metrics import (
    MetricError,
    answer_accuracy,
    answer_loss,
    at_answer,
    get_metric,
    logit_diff,
    normalized,
    tl_metric,
)
from toylens.analyze.pairs import PromptPairs


def seed_logits_to_ave_logit_diff(logits, answer_tokens, per_prompt=False):
    """Seed 003's function, verbatim (it reads the last position)."""
    final_logits = logits[:, -1, :]
    _, _, token_length = answer_tokens.shape
    all_token_logit_diffs = []
    for i in range(token_length):
        answer_tokens_at_pos = answer_tokens[:, :, i]
        answer_logits = final_logits.gather(dim=-1, index=answer_tokens_at_pos)
        token_logit_diff = answer_logits[:, 0] - answer_logits[:, 1]
        all_token_logit_diffs.append(token_logit_diff)
    stacked_diffs = torch.stack(all_token_logit_diffs, dim=1)
    answer_logit_diff = stacked_diffs.mean(dim=1)
    if per_prompt:
        return answer_logit_diff
    return answer_logit_diff.mean()


def make_pairs(b=5, n=6, k=3, vocab=50, seed=0, answer_pos=None):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (b, n), generator=g)
    corrupted = torch.randint(0, vocab, (b, n), generator=g)
    pos = torch.full((b,), n - 1) if answer_pos is None else answer_pos
    answers = torch.randint(0, vocab, (b, 2, k), generator=g)
    return PromptPairs(clean, corrupted, pos, answers)


def test_logit_diff_equals_seed_003_without_padding():
    pairs = make_pairs()
    logits = torch.randn(5, 6, 50, generator=torch.Generator().manual_seed(1))
    want = seed_logits_to_ave_logit_diff(logits, pairs.answers, per_prompt=True)
    got = logit_diff(at_answer(logits, pairs), pairs)
    torch.testing.assert_close(got, want)
    assert tl_metric("logit_diff", pairs)(logits).item() == pytest.approx(
        seed_logits_to_ave_logit_diff(logits, pairs.answers).item(), abs=1e-6)


def test_logit_diff_averages_over_non_padded_slots_at_answer_pos():
    pairs = make_pairs(answer_pos=torch.tensor([2, 5, 0, 3, 4]))
    answers = pairs.answers.clone()
    answers[0, 1, 2] = -1  # incorrect answer one token shorter: slot 2 is not scored
    answers[1, 0, 1:] = -1  # correct answer of one token: only slot 0
    pairs = PromptPairs(pairs.clean, pairs.corrupted, pairs.answer_pos, answers)
    logits = torch.randn(5, 6, 50, generator=torch.Generator().manual_seed(2))
    got = logit_diff(at_answer(logits, pairs), pairs)
    for b in range(5):
        row = logits[b, pairs.answer_pos[b]]
        diffs = [row[answers[b, 0, j]] - row[answers[b, 1, j]] for j in range(3)
                 if answers[b, 0, j] >= 0 and answers[b, 1, j] >= 0]
        assert got[b].item() == pytest.approx(sum(diffs).item() / len(diffs), abs=1e-6)


def test_loss_and_accuracy():
    pairs = make_pairs(k=2)
    answers = pairs.answers.clone()
    answers[3, 0, 1] = -1
    pairs = PromptPairs(pairs.clean, pairs.corrupted, pairs.answer_pos, answers)
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(3))
    logits[0, answers[0, 0, 0]] = 100.0  # row 0 predicts its first correct token
    loss = answer_loss(logits, pairs)
    for b in range(5):
        toks = [int(t) for t in answers[b, 0] if t >= 0]
        ce = [torch.nn.functional.cross_entropy(logits[b:b + 1], torch.tensor([t])).item() for t in toks]
        want = sum(ce) / len(ce)
        assert loss[b].item() == pytest.approx(want, abs=1e-5)
    acc = answer_accuracy(logits, pairs)
    assert acc[0].item() == 1.0
    assert torch.equal(acc, (logits.argmax(-1) == answers[:, 0, 0]).float())


def test_normalized_and_tl_metric():
    assert normalized(torch.tensor(3.0), 5.0, 1.0).item() == 0.5
    assert normalized(1.0, 5.0, 1.0) == 0.0 and normalized(5.0, 5.0, 1.0) == 1.0
    pairs = make_pairs()
    logits = torch.randn(5, 6, 50, generator=torch.Generator().manual_seed(4))
    raw = tl_metric("logit_diff", pairs)(logits).item()
    assert tl_metric("logit_diff", pairs, raw + 2.0, raw - 2.0)(logits).item() == pytest.approx(0.5)
    with pytest.raises(MetricError, match="normalize=False"):
        normalized(1.0, 2.0, 2.0)


def test_errors_name_the_fix():
    pairs = make_pairs()
    with pytest.raises(MetricError, match="metric='nope'.*logit_diff"):
        get_metric("nope")
    with pytest.raises(MetricError, match="logits_at_answer.*at_answer"):
        logit_diff(torch.randn(5, 6, 50), pairs)  # full logits where the answer position's are expected
    with pytest.raises(MetricError, match="logits"):
        at_answer(torch.randn(4, 6, 50), pairs)
    assert get_metric("loss") is answer_loss and get_metric(math.sqrt) is math.sqrt
