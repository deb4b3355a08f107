"""Hypothesis property tests over task configs and seeds (small batches, few examples)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from toylens.data import TASKS, make_task

FAST = settings(max_examples=30, deadline=None)


def batch_of(name: str, seed: int, batch_size: int, **cfg):
    task = make_task(TASKS[name].config_cls(**cfg))
    return task, task.sample(batch_size, torch.Generator().manual_seed(seed))


@FAST
@given(
    half=st.integers(1, 12),
    seed=st.integers(0, 2**31),
    batch_size=st.integers(1, 40),
)
def test_brackets_label_is_the_stack_check(half, seed, batch_size):
    task, b = batch_of("brackets", seed, batch_size, length=2 * half, frac_train=None)  # splits: test_splits.py
    n_true = 0
    for toks, target in zip(b.tokens[:, 1:-1].tolist(), b.targets[:, -1].tolist(), strict=True):
        stack: list[int] = []
        ok = True
        for t in toks:
            if t == task.token_names.index("("):
                stack.append(t)
            elif stack:
                stack.pop()
            else:
                ok = False
        ok = ok and not stack
        assert task.token_names[target] == ("T" if ok else "F")
        n_true += ok
    assert n_true == (batch_size + 1) // 2


@FAST
@given(
    name=st.sampled_from(["copy", "reverse", "sort"]),
    n_symbols=st.integers(2, 40),
    length=st.integers(1, 12),
    seed=st.integers(0, 2**31),
)
def test_seq2seq_answer_is_a_function_of_the_input(name, n_symbols, length, seed):
    task, b = batch_of(name, seed, 16, n_symbols=n_symbols, length=length, frac_train=None)
    expected = {"copy": lambda x: x, "reverse": lambda x: x[::-1], "sort": sorted}[name]
    for row in b.tokens.tolist():
        x, y = row[1 : length + 1], row[length + 2 :]
        assert y == expected(x)
        assert all(2 <= t < task.d_vocab for t in x)
    assert int(b.loss_mask.sum(dim=1).min()) == length == int(b.loss_mask.sum(dim=1).max())


@FAST
@given(
    data=st.data(),
    group_size=st.integers(1, 6),
    n_demos=st.integers(0, 5),
    seed=st.integers(0, 2**31),
)
def test_icl_follows_one_rule_per_row(data, group_size, n_demos, seed):
    ks = data.draw(st.lists(st.integers(0, group_size - 1), min_size=1, unique=True))
    n_symbols = data.draw(st.integers(max(2, group_size), 30))
    task, b = batch_of("icl", seed, 8, n_symbols=n_symbols, group_size=group_size, n_demos=n_demos, ks=ks)
    width = group_size + 3
    assert b.tokens.shape[1] == task.seq_len == (n_demos + 1) * width
    for row in b.tokens.tolist():
        groups = [row[s : s + group_size] for s in range(1, len(row), width)]
        answers = [row[s + group_size + 1] for s in range(1, len(row), width)]
        k = groups[0].index(answers[0])
        assert k in ks
        assert all(len(set(gr)) == group_size and a == gr[k] for gr, a in zip(groups, answers, strict=True))
    if len(ks) > 1:
        c = task.corrupt(b, torch.Generator().manual_seed(seed + 1))
        assert bool((task.rule_of(c) != task.rule_of(b)).all())


@FAST
@given(p=st.integers(2, 200), seed=st.integers(0, 2**31))
def test_modular_add_answer(p, seed):
    _, b = batch_of("modular_add", seed, 32, p=p)
    for (a, bb, eq), t in zip(b.tokens.tolist(), b.targets[:, 2].tolist(), strict=True):
        assert eq == p and t == (a + bb) % p
