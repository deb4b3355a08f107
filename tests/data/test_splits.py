"""Fixed train/held-out splits: disjoint by construction, the same on every build, one line for bad values."""

from __future__ import annotations

import pytest
import torch

from toylens.data import TASKS, make_task
from toylens.data.tasks._common import input_codes, split_u


def task_of(name: str, **overrides):
    return make_task(TASKS[name].config_cls(**overrides))


def pairs(batch) -> set:
    return set(map(tuple, batch.tokens[:, :2].tolist()))


def test_modular_add_split_partitions_all_pairs():
    p = 13
    task = task_of("modular_add", p=p, frac_train=0.3)
    train, test = pairs(task.train_set()), pairs(task.eval_set(10**6, seed=0))
    assert len(train) == round(0.3 * p * p) == len(task.train_set())  # no duplicates
    assert not train & test and len(train | test) == p * p
    assert set(map(tuple, task.split_pairs("train").tolist())) == train


def test_modular_add_split_depends_only_on_split_seed():
    a = task_of("modular_add", p=13, split_seed=3)
    b = task_of("modular_add", p=13, split_seed=3)
    c = task_of("modular_add", p=13, split_seed=4)
    assert torch.equal(a.train_set().tokens, b.train_set().tokens)
    assert pairs(a.train_set()) != pairs(c.train_set())
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(a.eval_set(50, seed=1).tokens, task_of("modular_add", p=13, split_seed=3).eval_set(50, 9).tokens)


def test_modular_add_full_batch_and_minibatches_come_from_the_training_pairs():
    task = task_of("modular_add", p=11, frac_train=0.5)
    gen = torch.Generator().manual_seed(0)
    full = task.train_batch(7, gen)
    assert torch.equal(full.tokens, task.train_set().tokens)  # full_batch ignores batch_size
    mini = task_of("modular_add", p=11, frac_train=0.5, full_batch=False).train_batch(7, gen)
    assert len(mini) == 7 and len(pairs(mini)) == 7 and pairs(mini) <= pairs(full)
    assert pairs(task.sample(500, gen)) <= pairs(full)
    for (a, b, eq), t in zip(full.tokens.tolist(), full.targets[:, 2].tolist(), strict=True):
        assert eq == task.EQ and t == (a + b) % 11


def test_modular_add_eval_set_is_capped_by_size():
    task = task_of("modular_add", p=11, frac_train=0.5)
    everything = task.eval_set(10**6, 0)
    assert len(everything) == 121 - 60 and torch.equal(task.eval_set(5, 0).tokens, everything.tokens[:5])


def inputs(task, batch) -> set:
    n = task.cfg.length
    return set(map(tuple, batch.tokens[:, 1 : n + 1].tolist()))


@pytest.mark.parametrize("name,cfg", [
    ("brackets", {"length": 8}),
    ("brackets", {"length": 16}),
    ("sort", {"n_symbols": 5, "length": 3}),
    ("copy", {"n_symbols": 4, "length": 4}),
    ("reverse", {"n_symbols": 20, "length": 8}),
])
def test_hashed_split_keeps_held_out_inputs_out_of_training(name, cfg):
    task = task_of(name, **cfg)
    train = task.sample(3000, torch.Generator().manual_seed(0))
    held = task.eval_set(1000, seed=1234)
    assert not inputs(task, train) & inputs(task, held)
    # membership is the documented hash, recomputed here
    n = task.cfg.length
    assert bool((split_u(input_codes(train.tokens[:, 1 : n + 1]), 0) < 0.8).all())
    assert bool((split_u(input_codes(held.tokens[:, 1 : n + 1]), 0) >= 0.8).all())
    # the same held-out set on a fresh build of the task
    assert torch.equal(held.tokens, task_of(name, **cfg).eval_set(1000, seed=1234).tokens)


def test_small_sort_split_holds_out_about_the_asked_share():
    task = task_of("sort", n_symbols=4, length=4)  # 256 inputs
    everything = torch.cartesian_prod(*[torch.arange(2, 6)] * 4)
    held = split_u(input_codes(everything), 0) >= 0.8
    assert 0.1 < float(held.float().mean()) < 0.3
    seen_train = inputs(task, task.sample(20_000, torch.Generator().manual_seed(0)))
    seen_held = inputs(task, task.eval_set(20_000, seed=0))
    assert seen_train == set(map(tuple, everything[~held].tolist()))  # every training input is reachable
    assert seen_held == set(map(tuple, everything[held].tolist()))


def test_brackets_split_keeps_exact_label_shares():
    task = task_of("brackets", length=16)
    held = task.eval_set(400, seed=0)
    assert int((held.targets[:, -1] == task.TRUE).sum()) == 200


@pytest.mark.parametrize("name,cfg,field", [
    ("modular_add", {"frac_train": 1.0}, "frac_train"),
    ("modular_add", {"frac_train": 0.0}, "frac_train"),
    ("brackets", {"frac_train": 1.5}, "frac_train"),
    ("brackets", {"length": 2}, "frac_train"),  # 4 strings: some kind would be missing on one side
    ("sort", {"n_symbols": 2, "length": 1}, "frac_train"),
])
def test_bad_split_names_the_field(name, cfg, field):
    with pytest.raises(ValueError) as e:
        task_of(name, **cfg)
    msg = str(e.value)
    assert msg.startswith(f"task.{field}=") and "\n" not in msg
    assert ("(0, 1)" in msg) if cfg.get("frac_train") is not None else ("frac_train=null" in msg)
