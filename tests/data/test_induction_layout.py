"""The induction task's random layout: the second copy starts at a random place and distance."""

from __future__ import annotations

import torch

from toylens.data import TASKS, make_task


def task_of(**overrides):
    return make_task(TASKS["induction"].config_cls(**overrides))


def copies(row: list[int], mask: list[bool], L: int) -> tuple[int, int]:
    """(first, second) start of the repeated segment, found by brute force from the tokens."""
    second = mask.index(True)
    seg = row[second : second + L]
    firsts = [s for s in range(1, second - L + 1) if row[s : s + L] == seg]
    return firsts[-1], second


def test_random_layout_repeats_a_segment_at_varying_offsets():
    L, pad = 5, 6
    task = task_of(n_symbols=30, half_len=L, pad=pad)
    b = task.sample(400, torch.Generator().manual_seed(0))
    assert task.seq_len == b.tokens.shape[1] == 1 + 2 * L + pad
    assert bool((b.tokens[:, 0] == 0).all()) and bool((b.tokens[:, 1:] > 0).all())
    seconds, gaps = set(), set()
    for row, tgt, mask in zip(b.tokens.tolist(), b.targets.tolist(), b.loss_mask.tolist(), strict=True):
        first, second = copies(row, mask, L)
        masked = [i for i, m in enumerate(mask) if m]
        assert masked == list(range(second, second + L - 1))  # x_1..x_{L-1} of the second copy
        for q in masked:  # the answer is the token after the same place in the first copy
            assert tgt[q] == row[q + 1] == row[q - (second - first) + 1]
        seconds.add(second)
        gaps.add(second - first - L)
    assert gaps == set(range(pad + 1))  # every distance L..L+pad occurs: no fixed offset predicts it
    assert len(seconds) >= pad


def test_fixed_layout_is_the_old_one_and_ignores_pad():
    task = task_of(n_symbols=10, half_len=4, layout="fixed", pad=9)
    b = task.sample(50, torch.Generator().manual_seed(0))
    assert b.tokens.shape[1] == 9 and torch.equal(b.tokens[:, 1:5], b.tokens[:, 5:])
    assert bool(b.loss_mask[:, 5:8].all()) and int(b.loss_mask.sum()) == 50 * 3


def test_random_layout_corrupt_removes_the_first_copy_and_keeps_the_answers():
    task = task_of(n_symbols=30, half_len=5, pad=6)
    b = task.sample(200, torch.Generator().manual_seed(0))
    c = task.corrupt(b, torch.Generator().manual_seed(1))
    assert torch.equal(c.loss_mask, b.loss_mask) and torch.equal(c.targets[c.loss_mask], b.targets[b.loss_mask])
    second = b.loss_mask.long().argmax(dim=1)
    pos = torch.arange(b.tokens.shape[1])
    before = (pos < second[:, None]) & (pos > 0)
    assert bool((c.tokens != b.tokens)[before].all()) and torch.equal(c.tokens[~before], b.tokens[~before])


def test_bad_layout_names_the_field():
    for cfg, field in [({"layout": "diagonal"}, "layout"), ({"pad": -1}, "pad")]:
        try:
            task_of(**cfg)
        except ValueError as e:
            assert str(e).startswith(f"task.{field}=")
        else:
            raise AssertionError(cfg)


def test_distinct_segment_makes_every_answer_unique():
    task = task_of(n_symbols=20, half_len=8, pad=8)
    b = task.sample(300, torch.Generator().manual_seed(0))
    for row, mask in zip(b.tokens.tolist(), b.loss_mask.tolist(), strict=True):
        for q in (i for i, m in enumerate(mask) if m):
            assert row[1:q].count(row[q]) == 1  # exactly one earlier occurrence: one possible answer
    loose = task_of(n_symbols=20, half_len=8, pad=8, distinct=False).sample(300, torch.Generator().manual_seed(0))
    repeats = [row[1:q].count(row[q]) > 1 for row, mask in zip(loose.tokens.tolist(), loose.loss_mask.tolist(),
                                                                strict=True) for q, m in enumerate(mask) if m]
    assert sum(repeats) > 0.2 * len(repeats)  # with replacement many answers are ambiguous


def test_distinct_needs_enough_symbols():
    try:
        task_of(n_symbols=16, half_len=16, pad=4)
    except ValueError as e:
        assert str(e).startswith("task.n_symbols=16") and "distinct=false" in str(e)
    else:
        raise AssertionError("accepted 16 symbols for a 16-symbol segment plus fillers")
    assert task_of(n_symbols=16, half_len=16, layout="fixed").seq_len == 33
