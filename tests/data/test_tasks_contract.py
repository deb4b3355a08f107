"""The Task contract, checked for every registered task: shapes, vocab, names, RNG, metrics, configs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from toylens.data import TASKS, Batch, make_task

ALL = ["prev_token", "induction", "copy", "reverse", "sort", "modular_add", "brackets", "icl"]
WITH_CORRUPT = ["prev_token", "induction", "copy", "reverse", "sort", "modular_add", "icl"]


def task_of(name: str, **overrides):
    return make_task(TASKS[name].config_cls(**overrides))


def sample(task, batch_size: int = 64, seed: int = 0, device: str = "cpu") -> Batch:
    return task.sample(batch_size, torch.Generator(device=device).manual_seed(seed))


def test_registry_holds_every_task_under_its_config_name():
    assert set(ALL) <= set(TASKS)
    for name in ALL:
        cls = TASKS[name]
        assert cls.name == name
        assert cls.config_cls().name == name
        assert make_task(cls.config_cls()).name == name


@pytest.mark.parametrize("name", ALL)
def test_config_is_a_hydra_structured_config(name):
    cfg_cls = TASKS[name].config_cls
    schema = OmegaConf.structured(cfg_cls())
    assert OmegaConf.to_object(schema) == cfg_cls()
    for f in dataclasses.fields(cfg_cls):
        assert f.type in ("int", "bool", "str", "float", "float | None", "list[int]"), (name, f.name, f.type)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_shapes_dtypes_and_token_range(name, batch_size):
    task = task_of(name)
    b = sample(task, batch_size)
    assert b.tokens.shape == b.targets.shape == b.loss_mask.shape == (batch_size, task.seq_len)
    assert b.tokens.dtype == b.targets.dtype == torch.long
    assert b.loss_mask.dtype == torch.bool
    for t in (b.tokens, b.targets):  # masked-out targets too must be valid ids
        assert int(t.min()) >= 0 and int(t.max()) < task.d_vocab
    assert bool(b.loss_mask.any(dim=1).all()), "every row must carry some loss"


@pytest.mark.parametrize("name", ALL)
def test_token_names(name):
    task = task_of(name)
    names = task.token_names
    assert len(names) == task.d_vocab
    assert len(set(names)) == len(names)
    assert all(n and not any(c.isspace() for c in n) for n in names)
    assert task.describe()["d_vocab"] == task.d_vocab


def test_symbol_names_stay_unique_past_the_alphabet():
    task = task_of("induction", n_symbols=60)
    names = task.token_names
    assert names[1:4] == ["a", "b", "c"] and names[27] == "a1" and len(set(names)) == 61


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_batch_other_seed_other_batch(name):
    task = task_of(name)
    a, b, c = sample(task, seed=3), sample(task, seed=3), sample(task, seed=4)
    for x, y in zip((a.tokens, a.targets, a.loss_mask), (b.tokens, b.targets, b.loss_mask), strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a.tokens, c.tokens)


@pytest.mark.parametrize("name", ALL)
def test_only_the_passed_generator_is_used(name):
    task = task_of(name)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    b = sample(task, seed=5)
    if name in WITH_CORRUPT:
        task.corrupt(b, torch.Generator().manual_seed(6))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)  # a different global state must not change the batch
    assert torch.equal(sample(task, seed=5).tokens, b.tokens)


@pytest.mark.parametrize("name", ALL)
def test_eval_set_is_fixed_by_its_seed(name):
    task = task_of(name)
    assert torch.equal(task.eval_set(16, seed=9).tokens, task.eval_set(16, seed=9).tokens)


def one_hot_logits(targets: torch.Tensor, d_vocab: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(targets, d_vocab).float()


@pytest.mark.parametrize("name", ALL)
def test_accuracy_is_one_for_perfect_logits_and_zero_for_wrong_ones(name):
    task = task_of(name)
    b = sample(task, 32)
    perfect = one_hot_logits(b.targets, task.d_vocab)
    wrong = one_hot_logits((b.targets + 1) % task.d_vocab, task.d_vocab)
    assert float(task.accuracy(perfect, b)) == 1.0
    assert float(task.accuracy(wrong, b)) == 0.0
    assert task.accuracy(perfect, b).ndim == 0


@pytest.mark.parametrize("name", ["copy", "reverse", "sort"])
def test_seq2seq_accuracy_counts_whole_answers(name):
    task = task_of(name)
    b = sample(task, 10)
    logits = one_hot_logits(b.targets, task.d_vocab)
    pos = task.cfg.length + 3  # one answer position (y_2) in row 0
    logits[0, pos] = one_hot_logits((b.targets[0, pos] + 1) % task.d_vocab, task.d_vocab)
    assert float(task.accuracy(logits, b)) == pytest.approx(0.9)  # per-position would be 79/80


def test_icl_accuracy_is_on_the_query_answer_only():
    task = task_of("icl")
    b = sample(task, 10)
    logits = one_hot_logits((b.targets + 1) % task.d_vocab, task.d_vocab)  # every answer wrong...
    q = task.arrow_position()
    logits[:, q] = one_hot_logits(b.targets[:, q], task.d_vocab)  # ...but the query's
    assert float(task.accuracy(logits, b)) == 1.0
    logits[:4, q] = 0.0
    logits[:4, q, 0] = 1.0  # predicts BOS for the query in 4 rows
    assert float(task.accuracy(logits, b)) == pytest.approx(0.6)


@pytest.mark.parametrize("name", WITH_CORRUPT)
def test_corrupt_keeps_the_shape_and_changes_the_prompt(name):
    task = task_of(name)
    b = sample(task, 32)
    c = task.corrupt(b, torch.Generator().manual_seed(1))
    assert c.tokens.shape == b.tokens.shape and c.loss_mask.shape == b.loss_mask.shape
    assert int(c.tokens.min()) >= 0 and int(c.tokens.max()) < task.d_vocab
    assert not torch.equal(c.tokens, b.tokens)


def test_brackets_offers_no_corrupt():
    task = task_of("brackets")
    with pytest.raises(NotImplementedError):
        task.corrupt(sample(task, 4), torch.Generator())


BAD_CONFIGS = [
    ("prev_token", {"d_vocab": 2}, "d_vocab"),
    ("prev_token", {"seq_len": 1}, "seq_len"),
    ("induction", {"n_symbols": 1}, "n_symbols"),
    ("induction", {"half_len": 1}, "half_len"),
    ("copy", {"n_symbols": 1}, "n_symbols"),
    ("reverse", {"length": 0}, "length"),
    ("sort", {"length": -2}, "length"),
    ("modular_add", {"p": 1}, "p"),
    ("brackets", {"length": 7}, "length"),
    ("brackets", {"length": 0}, "length"),
    ("icl", {"n_symbols": 2}, "n_symbols"),  # fewer symbols than group_size=3
    ("icl", {"group_size": 0, "ks": [0]}, "group_size"),
    ("icl", {"n_demos": -1}, "n_demos"),
    ("icl", {"ks": []}, "ks"),
    ("icl", {"ks": [0, 3]}, "ks"),
    ("icl", {"ks": [-1]}, "ks"),
    ("icl", {"ks": [1, 1]}, "ks"),
]


@pytest.mark.parametrize(("name", "overrides", "field"), BAD_CONFIGS)
def test_invalid_config_raises_a_one_line_error_naming_the_field(name, overrides, field):
    with pytest.raises(ValueError, match=rf"^task\.{field}=") as err:
        task_of(name, **overrides)
    assert "\n" not in str(err.value)


def test_icl_corrupt_needs_two_rules():
    task = task_of("icl", ks=[1])
    with pytest.raises(ValueError, match=r"task\.ks="):
        task.corrupt(sample(task, 4), torch.Generator())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ALL)
def test_sampling_happens_on_the_generator_device(name):
    task = task_of(name)
    b = sample(task, 16, device="cuda")
    assert b.tokens.is_cuda and b.targets.is_cuda and b.loss_mask.is_cuda
    if name in WITH_CORRUPT:
        assert task.corrupt(b, torch.Generator(device="cuda").manual_seed(0)).tokens.is_cuda


def test_batch_rejects_a_non_bool_mask_and_mixed_shapes_and_compares_by_identity():
    from toylens.data.base import Batch

    t = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"loss_mask must be a bool tensor.*mask.bool\(\)"):
        Batch(t, t, torch.ones(2, 3))
    with pytest.raises(ValueError, match="one \\[batch, pos\\] shape"):
        Batch(t, t[:, :2], torch.ones(2, 3, dtype=torch.bool))
    b = Batch(t, t, torch.ones(2, 3, dtype=torch.bool))
    assert b == b and b != Batch(t, t, b.loss_mask)  # identity, never an ambiguous tensor comparison
