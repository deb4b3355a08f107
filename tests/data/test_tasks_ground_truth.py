"""Each task's answers recomputed from its tokens with plain Python, independently of the generators."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from toylens.data import TASKS, make_task

N = 300  # rows checked per task


def task_of(name: str, **overrides):
    return make_task(TASKS[name].config_cls(**overrides))


def rows_of(task, batch_size: int = N, seed: int = 0):
    """The batch as Python lists of token names, targets names and masked positions, per row."""
    b = task.sample(batch_size, torch.Generator().manual_seed(seed))
    names = task.token_names
    for toks, tgts, mask in zip(b.tokens.tolist(), b.targets.tolist(), b.loss_mask.tolist(), strict=True):
        yield [names[t] for t in toks], [names[t] for t in tgts], [i for i, m in enumerate(mask) if m]


def assert_next_token_targets(toks, tgts, masked):
    assert all(tgts[i] == toks[i + 1] for i in masked)


def test_prev_token():
    task = task_of("prev_token", d_vocab=20, seq_len=12)
    for toks, tgts, masked in rows_of(task):
        assert toks[0] == "BOS" and "BOS" not in toks[1:]
        assert masked == list(range(1, 12))
        assert all(tgts[i] == toks[i - 1] for i in masked)


def test_induction_fixed_layout():
    L = 6
    task = task_of("induction", n_symbols=10, half_len=L, layout="fixed")
    for toks, tgts, masked in rows_of(task):
        assert toks[0] == "BOS" and "BOS" not in toks[1:]
        assert toks[1 : L + 1] == toks[L + 1 :]
        assert masked == list(range(L + 1, 2 * L))
        assert_next_token_targets(toks, tgts, masked)
        for p in masked:  # the answer is what followed the same position in the first half
            assert tgts[p] == toks[p - L + 1]


def test_induction_corrupt_removes_the_induction_cue_fixed_layout():
    L = 6
    task = task_of("induction", n_symbols=10, half_len=L, layout="fixed")
    b = task.sample(N, torch.Generator().manual_seed(0))
    c = task.corrupt(b, torch.Generator().manual_seed(1))
    assert torch.equal(c.tokens[:, L + 1 :], b.tokens[:, L + 1 :])
    assert torch.equal(c.loss_mask, b.loss_mask)
    assert torch.equal(c.targets[c.loss_mask], b.targets[b.loss_mask])
    assert bool((c.tokens[:, 1 : L + 1] != b.tokens[:, 1 : L + 1]).all())
    for toks, tgts, mask in zip(c.tokens.tolist(), c.targets.tolist(), c.loss_mask.tolist(), strict=True):
        # the token after the matching first-half position no longer is the answer
        assert all(toks[p - L + 1] != tgts[p] for p in range(len(mask)) if mask[p])


ANSWER = {"copy": lambda x: x, "reverse": lambda x: x[::-1], "sort": lambda x: sorted(x, key=ord)}


@pytest.mark.parametrize("name", ["copy", "reverse", "sort"])
def test_seq2seq(name):
    n = 7
    task = task_of(name, n_symbols=5, length=n)
    repeats = 0
    for toks, tgts, masked in rows_of(task):
        assert toks[0] == "BOS" and toks[n + 1] == "SEP"
        x, y = toks[1 : n + 1], toks[n + 2 :]
        assert len(y) == n and not {"BOS", "SEP"} & set(x + y)
        assert y == ANSWER[name](x)
        assert masked == list(range(n + 1, 2 * n + 1))
        assert_next_token_targets(toks, tgts, masked)
        repeats += len(set(x)) < n
    assert repeats > 0  # sampled with replacement


@pytest.mark.parametrize("name", ["copy", "reverse", "sort"])
def test_seq2seq_corrupt_changes_the_answer(name):
    n = 6
    task = task_of(name, n_symbols=8, length=n)
    b = task.sample(N, torch.Generator().manual_seed(0))
    c = task.corrupt(b, torch.Generator().manual_seed(1))
    assert bool((c.tokens[:, 1 : n + 1] != b.tokens[:, 1 : n + 1]).all())
    names = task.token_names
    for row in c.tokens.tolist():
        toks = [names[t] for t in row]
        assert toks[n + 2 :] == ANSWER[name](toks[1 : n + 1])
    changed = (c.tokens[:, n + 2 :] != b.tokens[:, n + 2 :]).any(dim=1).float().mean()
    if name == "sort":  # a different multiset can sort to the same list, rarely
        assert float(changed) > 0.95
    else:
        assert float(changed) == 1.0


def test_modular_add():
    p = 13
    task = task_of("modular_add", p=p)
    for toks, tgts, masked in rows_of(task):
        a, b = int(toks[0]), int(toks[1])
        assert toks[2] == "=" and 0 <= a < p and 0 <= b < p
        assert masked == [2]
        assert tgts[2] == str((a + b) % p)


def test_modular_add_training_samples_cover_the_training_pairs_only():
    task = task_of("modular_add", p=5, frac_train=0.6)
    b = task.sample(2000, torch.Generator().manual_seed(0))
    assert set(map(tuple, b.tokens[:, :2].tolist())) == set(map(tuple, task.split_pairs("train").tolist()))
    assert len(task.split_pairs("train")) == 15


def test_modular_add_corrupt_resamples_a():
    p = 13
    task = task_of("modular_add", p=p)
    b = task.sample(N, torch.Generator().manual_seed(0))
    c = task.corrupt(b, torch.Generator().manual_seed(1))
    assert torch.equal(c.tokens[:, 1:], b.tokens[:, 1:])
    assert bool((c.tokens[:, 0] != b.tokens[:, 0]).all())
    assert bool((c.targets[:, 2] != b.targets[:, 2]).all())
    for (a, bb, _), t in zip(c.tokens.tolist(), c.targets[:, 2].tolist(), strict=True):
        assert t == (a + bb) % p
    assert len(set(c.tokens[:, 0].tolist())) == p  # all values of a reachable


def balanced(chars) -> bool:
    depth = 0
    for ch in chars:
        depth += 1 if ch == "(" else -1
        if depth < 0:
            return False
    return depth == 0


def test_brackets():
    n = 10
    task = task_of("brackets", length=n)
    n_true = n_equal_false = 0
    for toks, tgts, masked in rows_of(task):
        c = toks[1:-1]
        assert toks[0] == "BOS" and toks[-1] == "=" and set(c) <= {"(", ")"}
        assert masked == [n + 1]
        assert tgts[n + 1] == ("T" if balanced(c) else "F")
        n_true += balanced(c)
        n_equal_false += not balanced(c) and c.count("(") == c.count(")")
    assert n_true == N // 2  # exactly half balanced
    assert 0.6 < n_equal_false / (N - n_true) < 0.9  # most negatives pass a counting check


def test_brackets_balanced_strings_are_uniform():
    task = task_of("brackets", length=6, frac_train=None)  # 5 balanced strings of length 6
    seen = Counter("".join(toks[1:-1]) for toks, tgts, _ in rows_of(task, 4000, seed=1) if tgts[-1] == "T")
    assert len(seen) == 5
    assert all(abs(k / 2000 - 0.2) < 0.04 for k in seen.values()), seen


def test_brackets_shortest_length():
    task = task_of("brackets", length=2, frac_train=None)
    strings = Counter("".join(toks[1:-1]) for toks, _, _ in rows_of(task, 400))
    assert strings["()"] == 200 and set(strings) == {"()", ")(", "((", "))"}


def icl_groups(toks, g):
    """Split an icl row into (group, answer) pairs, checking the separators on the way."""
    assert toks[0] == "BOS"
    width, out = g + 3, []
    for start in range(1, len(toks), width):
        group = toks[start : start + g]
        assert toks[start + g] == "->"
        out.append((group, toks[start + g + 1]))
        if start + g + 2 < len(toks):
            assert toks[start + g + 2] == ";"
    return out


def test_icl():
    g, n_demos, ks = 4, 3, [0, 2, 3]
    task = task_of("icl", n_symbols=9, group_size=g, n_demos=n_demos, ks=ks)
    rules = Counter()
    for toks, tgts, masked in rows_of(task):
        groups = icl_groups(toks, g)
        assert len(groups) == n_demos + 1 and len(toks) == task.seq_len
        assert all(len(set(group)) == g for group, _ in groups)  # distinct within a group
        k = groups[0][0].index(groups[0][1])
        assert k in ks
        assert all(answer == group[k] for group, answer in groups)  # one rule per row
        assert masked == [i for i, t in enumerate(toks) if t == "->"]
        assert masked[-1] == task.arrow_position() == len(toks) - 2
        assert tgts[masked[-1]] == toks[-1] == groups[-1][0][k]
        assert_next_token_targets(toks, tgts, masked)
        rules[k] += 1
    assert set(rules) == set(ks) and min(rules.values()) > N / len(ks) / 2


@pytest.mark.parametrize("n_demos", [0, 1, 5])
def test_icl_sample_rule(n_demos):
    task = task_of("icl")
    b = task.sample_rule(50, torch.Generator().manual_seed(0), k=1, n_demos=n_demos)
    assert b.tokens.shape == (50, task.seq_len_for(n_demos))
    assert task.arrow_position(n_demos) == b.tokens.shape[1] - 2
    names = task.token_names
    for row in b.tokens.tolist():
        groups = icl_groups([names[t] for t in row], 3)
        assert len(groups) == n_demos + 1
        assert all(answer == group[1] for group, answer in groups)
    with pytest.raises(ValueError):
        task.sample_rule(2, torch.Generator(), k=3)


def test_icl_corrupt_switches_the_rule_and_keeps_the_symbols():
    g = 3
    task = task_of("icl", group_size=g, ks=[0, 1, 2])
    b = task.sample(N, torch.Generator().manual_seed(0))
    c = task.corrupt(b, torch.Generator().manual_seed(1))
    names = task.token_names
    for clean, bad, tgts in zip(b.tokens.tolist(), c.tokens.tolist(), c.targets.tolist(), strict=True):
        cg, bg = icl_groups([names[t] for t in clean], g), icl_groups([names[t] for t in bad], g)
        assert [group for group, _ in cg] == [group for group, _ in bg]  # same symbols
        k, k2 = cg[0][0].index(cg[0][1]), bg[0][0].index(bg[0][1])
        assert k2 != k and k2 in task.ks
        assert all(answer == group[k2] for group, answer in bg)  # the new rule everywhere
        assert names[tgts[task.arrow_position()]] == bg[-1][0][k2]  # targets follow it
    assert bool((task.rule_of(c) != task.rule_of(b)).all())


def test_icl_symbols_are_uniform_at_every_group_position():
    task = task_of("icl", n_symbols=10, group_size=4, n_demos=4, ks=[0])
    b = task.sample(1000, torch.Generator().manual_seed(2))
    width = task.cfg.group_size + 3
    for i in range(task.cfg.group_size):  # 5000 draws per position, 500 expected per symbol
        counts = torch.bincount(b.tokens[:, 1 + i :: width].flatten() - 3, minlength=10)
        assert counts.numel() == 10 and int(counts.min()) > 400 and int(counts.max()) < 600, counts


def test_icl_fillers_scatter_between_groups():
    """``fillers: F``: each row is the no-filler layout with F "_" tokens inserted in the gaps before
    groups, the final "->" fixed, every gap used, and corrupt/rule_of/query_group see through them."""
    g, n_demos, fillers = 2, 3, 4
    task = task_of("icl", n_symbols=7, group_size=g, n_demos=n_demos, ks=[0, 1], fillers=fillers)
    plain = task_of("icl", n_symbols=7, group_size=g, n_demos=n_demos, ks=[0, 1])
    assert task.d_vocab == plain.d_vocab + 1 and task.token_names == [*plain.token_names, "_"]
    assert task.seq_len == plain.seq_len + fillers
    b = task.sample(N, torch.Generator().manual_seed(0))
    names = task.token_names
    per_gap = Counter()
    for toks, tgts, masked in rows_of(task):
        assert toks.count("_") == fillers and len(toks) == task.seq_len
        assert masked[-1] == task.arrow_position() == len(toks) - 2 and toks[-2] == "->"
        assert_next_token_targets(toks, tgts, masked)
        squeezed = [t for t in toks if t != "_"]
        groups = icl_groups(squeezed, g)  # the no-filler layout underneath
        k = groups[0][0].index(groups[0][1])
        assert all(answer == group[k] for group, answer in groups)
        for i, t in enumerate(toks):  # a filler follows BOS, ";" or another filler, and precedes a group
            if t == "_":
                assert toks[i - 1] in ("BOS", ";", "_") and toks[i + 1] not in ("->", ";")
                per_gap[sum(1 for u in toks[:i] if u == ";")] += 1
    assert set(per_gap) == set(range(n_demos + 1))  # every gap, the one before the query included
    k = task.rule_of(b)
    q = task.query_group(b.tokens)
    assert (b.tokens[:, -1] == task.answer(q, k)).all()
    c = task.corrupt(b, torch.Generator().manual_seed(1))
    assert ((c.tokens == task.filler) == (b.tokens == task.filler)).all()  # fillers stay put
    assert (task.rule_of(c) != k).all() and (c.tokens[:, -1] == task.answer(q, task.rule_of(c))).all()
    changed = (c.tokens != b.tokens).nonzero()[:, 1]
    assert set(changed.tolist()) <= set((b.tokens == task.ARROW).nonzero()[:, 1].add(1).tolist())
    assert [names[t] for t in task.zero_shot(q[:2])[0]] == ["BOS", ";", *[names[t] for t in q[0]], "->"]
    with pytest.raises(ValueError, match="not an icl layout"):
        task.corrupt(plain.sample(4, torch.Generator()), torch.Generator())
    with pytest.raises(ValueError, match="task.fillers=-1"):
        task_of("icl", fillers=-1)
