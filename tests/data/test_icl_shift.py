"""``icl`` with ``rule: shift``: answers recomputed by hand from token names, and ``answer`` for both rules."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from toylens.data import TASKS, make_task

N = 300
LETTERS = "abcdefghij"  # the 10 symbols' names


def shift_task(**overrides):
    cfg = dict(rule="shift", n_symbols=10, group_size=1, n_demos=3, ks=[1, 4, 7])
    cfg.update(overrides)
    return make_task(TASKS["icl"].config_cls(**cfg))


def pairs_of(names):
    """``[(x, y), ...]`` of one shift row, checking the ``BOS x -> y ; x -> y ...`` layout on the way."""
    assert names[0] == "BOS"
    out = []
    for start in range(1, len(names), 4):
        x, arrow, y = names[start : start + 3]
        assert arrow == "->"
        if start + 3 < len(names):
            assert names[start + 3] == ";"
        out.append((x, y))
    return out


def shift_of(x, y):
    return (LETTERS.index(y) - LETTERS.index(x)) % 10


def test_every_answer_is_the_rows_one_shift():
    task = shift_task()
    b = task.sample(N, torch.Generator().manual_seed(0))
    names, rules = task.token_names, Counter()
    for toks, tgts, mask in zip(b.tokens.tolist(), b.targets.tolist(), b.loss_mask.tolist(), strict=True):
        row = [names[t] for t in toks]
        pairs = pairs_of(row)
        assert len(pairs) == 4 and len(row) == task.seq_len == 16
        k = shift_of(*pairs[0])
        assert k in task.ks
        assert all(LETTERS[(LETTERS.index(x) + k) % 10] == y for x, y in pairs)  # one rule per row, mod 10
        arrows = [i for i, m in enumerate(mask) if m]
        assert arrows == [i for i, t in enumerate(row) if t == "->"] and arrows[-1] == task.arrow_position() == 14
        assert all(tgts[i] == toks[i + 1] for i in arrows)
        rules[k] += 1
    assert set(rules) == {1, 4, 7} and min(rules.values()) > N / 6
    assert bool((task.rule_of(b) == torch.tensor([shift_of(*pairs_of([names[t] for t in r])[0])
                                                   for r in b.tokens.tolist()])).all())


def test_answers_wrap_around():
    task = shift_task(ks=[7])
    b = task.sample(N, torch.Generator().manual_seed(1))
    x, y = b.tokens[:, 1::4] - 3, b.tokens[:, 3::4] - 3
    assert bool((y == (x + 7) % 10).all()) and bool((y < x).any()) and bool((y > x).any())


@pytest.mark.parametrize("n_demos", [0, 2])
def test_sample_rule_any_shift(n_demos):
    task = shift_task()
    b = task.sample_rule(50, torch.Generator().manual_seed(2), k=9, n_demos=n_demos)  # 9 is not in ks
    assert b.tokens.shape == (50, task.seq_len_for(n_demos)) == (50, 4 * (n_demos + 1))
    for row in b.tokens.tolist():
        assert all(shift_of(x, y) == 9 for x, y in pairs_of([task.token_names[t] for t in row]))
    with pytest.raises(ValueError, match="n_symbols"):
        task.sample_rule(2, torch.Generator(), k=10)


def test_corrupt_changes_the_shift_and_keeps_the_symbols():
    task = shift_task()
    b = task.sample(N, torch.Generator().manual_seed(3))
    c = task.corrupt(b, torch.Generator().manual_seed(4))
    torch.testing.assert_close(c.tokens[:, 1::4], b.tokens[:, 1::4])  # same x's
    k, k2 = task.rule_of(b), task.rule_of(c)
    assert bool((k2 != k).all()) and set(k2.tolist()) <= {1, 4, 7}
    x = c.tokens[:, 1::4] - 3
    torch.testing.assert_close(c.tokens[:, 3::4] - 3, (x + k2[:, None]) % 10)
    torch.testing.assert_close(c.targets[:, task.arrow_position()], c.tokens[:, -1])


def test_answer_matches_the_layout_for_both_rules():
    pick = make_task(TASKS["icl"].config_cls(n_symbols=9, group_size=3, ks=[0, 2]))
    groups = torch.tensor([[3, 5, 7], [11, 4, 9]])
    assert pick.answer(groups, 2).tolist() == [7, 9]
    assert pick.answer(groups, torch.tensor([0, 1])).tolist() == [3, 4]
    assert pick.answer(groups[None].expand(2, 2, 3), torch.tensor([1, 2])).tolist() == [[5, 4], [7, 9]]
    shift = shift_task()
    xs = torch.tensor([[3], [12], [8]])  # symbols a, j, f
    assert shift.answer(xs, 4).tolist() == [7, 6, 12]  # e, d, j
    assert shift.answer(xs, torch.tensor([0, 1, 9])).tolist() == [3, 3, 7]
    assert pick.cfg.rule == "pick" and pick.n_rules == 3 and shift.n_rules == 10


@pytest.mark.parametrize("overrides,field", [
    ({"rule": "rotate"}, "task.rule="),
    ({"group_size": 3}, "task.group_size="),
    ({"ks": [1, 10]}, "task.ks="),
    ({"ks": [-1]}, "task.ks="),
])
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field) as err:
        shift_task(**overrides)
    assert "\n" not in str(err.value)
