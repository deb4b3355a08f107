"""Toy models take strings (attach_tokenizer, Run.model), test_prompt against a hand computation and against
TransformerLens's own printout, and clean/corrupted pairs from tasks and from prompt strings."""

from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch

from toylens._compat import HookedTransformerConfig
from toylens.analyze.pairs import PairsError
from toylens.analyze.prompts import PromptError, attach_tokenizer, pairs_from_prompts, pairs_from_task, test_prompt
from toylens.data import TASKS, make_task
from toylens.data.tasks.prev_token import PrevToken
from toylens.data.tokenizer import TokenizerError
from toylens.model.build import make_model

WITH_CORRUPT = ["prev_token", "induction", "copy", "reverse", "sort", "modular_add", "icl"]
PROMPT = "a b c -> c ; d e f ->"


def toy_model(task, seed=0):
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=2, d_head=16, d_mlp=64, act_fn="relu",
                                  d_vocab=task.d_vocab, n_ctx=task.seq_len, seed=seed)
    return make_model(cfg).eval()


@pytest.fixture(scope="module")
def icl():
    task = make_task(TASKS["icl"].config_cls())
    return task, attach_tokenizer(toy_model(task), task)


def ids(task, text):
    return [task.token_names.index(w) for w in text.split()]


# --- strings in -----------------------------------------------------------------------------------
def test_toy_model_takes_strings(icl):
    task, model = icl
    expected = [task.BOS] + ids(task, PROMPT)  # the task's BOS first, as in every training sequence
    assert model.to_tokens(PROMPT).tolist() == [expected]
    assert model.to_tokens(PROMPT, prepend_bos=False).tolist() == [expected[1:]]
    assert model.to_str_tokens(PROMPT) == ["BOS"] + PROMPT.split()
    assert model.to_string(torch.tensor(expected)) == "BOS " + PROMPT
    with torch.no_grad():
        assert torch.equal(model(PROMPT), model(torch.tensor([expected])))
    with pytest.raises(TokenizerError, match="unknown word 'zz'"):
        model.to_tokens("a b zz")
    with pytest.raises(TokenizerError, match="already starts with BOS"):
        model.to_tokens("BOS " + PROMPT)  # the default prepends another BOS: refused, not doubled
    assert model.to_tokens("BOS " + PROMPT, prepend_bos=False).tolist() == [expected]


def test_bos_less_task_prepends_nothing():
    task = make_task(TASKS["modular_add"].config_cls(p=7))
    model = attach_tokenizer(toy_model(task), task)
    assert not model.cfg.default_prepend_bos
    assert model.to_tokens("3 4 =").tolist() == [[3, 4, 7]]
    with pytest.raises(TokenizerError, match="no BOS token"):
        model.to_tokens("3 4 =", prepend_bos=True)


def test_vocabulary_must_fit_the_model():
    small = make_task(TASKS["icl"].config_cls(n_symbols=4))
    with pytest.raises(PromptError, match="d_vocab=7.*smaller than the 29 token names"):
        attach_tokenizer(toy_model(small), make_task(TASKS["icl"].config_cls()))


def test_run_model_has_the_task_tokenizer(tmp_path, tiny_run):
    from toylens.runs.run import load_run

    run = load_run(tiny_run(tmp_path / "run"))
    row = run.batch(1).tokens[0]
    names = run.task.token_names
    for model in (run.model(), run.model(folded=True)):
        assert model.to_str_tokens(row) == [names[i] for i in row]
        text = " ".join(names[i] for i in row[1:])
        assert model.to_tokens(text).tolist() == [row.tolist()]  # BOS prepended


# --- test_prompt --------------------------------------------------------------------------------------
def reference_test_prompt(model, tokens, n_prompt, top_k):
    """Plain loop: one forward pass over prompt + whole answer, sort each position's logits by hand."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens]))[0]
    out = []
    for i, answer in enumerate(tokens[n_prompt:]):
        row = logits[n_prompt - 1 + i].tolist()
        order = sorted(range(len(row)), key=lambda t: -row[t])
        probs = torch.tensor(row).softmax(0).tolist()
        out.append(dict(rank=order.index(answer), logit=row[answer], prob=probs[answer], top=order[:top_k],
                        top_logits=[row[t] for t in order[:top_k]], top_probs=[probs[t] for t in order[:top_k]]))
    return out


def test_test_prompt_equals_a_hand_computation(icl):
    task, model = icl
    answer = "f ; g h"  # four tokens, scored with teacher forcing
    res = test_prompt(model, PROMPT, answer, top_k=5)
    tokens = [task.BOS] + ids(task, PROMPT) + ids(task, answer)
    ref = reference_test_prompt(model, tokens, len(ids(task, PROMPT)) + 1, 5)
    assert res.answer_str_tokens == answer.split() and res.prompt_str_tokens == ["BOS"] + PROMPT.split()
    assert res.answer_tokens.tolist() == ids(task, answer)
    assert res.ranks.tolist() == [r["rank"] for r in ref]
    assert res.top_tokens.tolist() == [r["top"] for r in ref]
    assert res.top_str_tokens == [[task.token_names[t] for t in r["top"]] for r in ref]
    torch.testing.assert_close(res.answer_logits, torch.tensor([r["logit"] for r in ref]), atol=1e-5, rtol=0)
    torch.testing.assert_close(res.answer_probs, torch.tensor([r["prob"] for r in ref]), atol=1e-6, rtol=0)
    torch.testing.assert_close(res.top_logits, torch.tensor([r["top_logits"] for r in ref]), atol=1e-5, rtol=0)
    torch.testing.assert_close(res.top_probs, torch.tensor([r["top_probs"] for r in ref]), atol=1e-6, rtol=0)
    assert set(res.figures()) == {f"test_prompt/answer{i}" for i in range(4)}
    assert res.to_dict()["ranks"] == res.ranks.tolist()


def test_test_prompt_prints_what_transformer_lens_prints(icl):
    _, model = icl
    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
        warnings.simplefilter("ignore", DeprecationWarning)
        import transformer_lens.utils as tl_utils

        tl_utils.test_prompt(PROMPT, "f ; g", model, top_k=4)
    ours = test_prompt(model, PROMPT, "f ; g", top_k=4).text()
    assert ours.split() == buf.getvalue().split()  # word by word: rich wraps long lines at the terminal width


def test_test_prompt_bad_input(icl):
    task, model = icl
    with pytest.raises(PromptError, match="answer: unknown word 'zz'"):
        test_prompt(model, PROMPT, "zz")
    too_long = " ".join(["a"] * task.seq_len)  # with BOS one more than n_ctx: refused, not truncated
    with pytest.raises(PromptError, match=f"prompt has 31 tokens, more than the model's n_ctx={task.seq_len}"):
        test_prompt(model, too_long, "b")
    full = " ".join(["a"] * (task.seq_len - 1))  # fits; its answer's second token would not
    assert test_prompt(model, full, "b").ranks.shape == (1,)
    with pytest.raises(PromptError, match=r"plus answer \(2\) need 31 positions, more than n_ctx=30"):
        test_prompt(model, full, "b c")
    with pytest.raises(PromptError, match="model has no tokenizer"):
        test_prompt(toy_model(task), PROMPT, "f")


# --- pairs from a task ----------------------------------------------------------------------------------
def reference_contrast(task, clean, corrupted, r):
    """Plain loop over one row: (answer_pos, clean answer, corrupted answer) or None."""
    if task.name == "induction":  # the last predicted position; the token after its first occurrence
        masked = [j for j in range(clean.tokens.shape[1]) if clean.loss_mask[r, j]]
        p, second = masked[-1], masked[0]
        src = 1 + max(j for j in range(second) if clean.tokens[r, j] == clean.tokens[r, p])
        assert clean.targets[r, p] == clean.tokens[r, src]  # the induction answer is the clean target
        return p, int(clean.tokens[r, src]), int(corrupted.tokens[r, src])
    for j in reversed(range(clean.tokens.shape[1])):
        if clean.loss_mask[r, j] and clean.targets[r, j] != corrupted.targets[r, j]:
            return j, int(clean.targets[r, j]), int(corrupted.targets[r, j])
    return None


@pytest.mark.parametrize("name", WITH_CORRUPT)
def test_pairs_from_task_match_a_plain_loop(name):
    task = make_task(TASKS[name].config_cls())
    n, seed = 48, 3
    pairs = pairs_from_task(task, n, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    clean = task.sample(n, gen)
    corrupted = task.corrupt(clean, gen)
    rows = [(r, c) for r in range(n) if (c := reference_contrast(task, clean, corrupted, r)) is not None]
    m = min(len(rows), n)
    assert m >= n - 2 and pairs.batch_size == n and pairs.answers.shape == (n, 2, 1)
    keep = torch.tensor([r for r, _ in rows[:m]])
    assert torch.equal(pairs.clean[:m], clean.tokens[keep]) and torch.equal(pairs.corrupted[:m], corrupted.tokens[keep])
    assert pairs.answer_pos[:m].tolist() == [c[0] for _, c in rows[:m]]
    assert pairs.answers[:m, :, 0].tolist() == [[c[1], c[2]] for _, c in rows[:m]]
    assert (pairs.answers[:, 0, 0] != pairs.answers[:, 1, 0]).all()
    assert pairs.str_tokens == [task.token_names[i] for i in pairs.clean[0]]
    again, other = pairs_from_task(task, n, seed=seed), pairs_from_task(task, n, seed=seed + 1)
    assert torch.equal(again.clean, pairs.clean) and torch.equal(again.answers, pairs.answers)
    assert not torch.equal(other.clean, pairs.clean)


def test_pairs_from_task_positions_per_task():
    icl = make_task(TASKS["icl"].config_cls())
    assert (pairs_from_task(icl, 16).answer_pos == icl.arrow_position()).all()
    madd = make_task(TASKS["modular_add"].config_cls(p=11))
    p = pairs_from_task(madd, 16)
    assert (p.answer_pos == 2).all()
    assert torch.equal(p.answers[:, 0, 0], (p.clean[:, 0] + p.clean[:, 1]) % 11)
    assert torch.equal(p.answers[:, 1, 0], (p.corrupted[:, 0] + p.corrupted[:, 1]) % 11)


def test_pairs_from_task_skips_rows_where_nothing_changes():
    # sort of 2 symbols out of 2: corrupt() flips every symbol, so "a b" -> "b a" sorts the same (half the rows)
    task = make_task(TASKS["sort"].config_cls(n_symbols=2, length=2))
    p = pairs_from_task(task, 40, seed=0)
    assert p.batch_size == 40 and (p.answers[:, 0, 0] != p.answers[:, 1, 0]).all()

    class NoChange(PrevToken):
        def corrupt(self, batch, generator):
            return batch

    with pytest.raises(PairsError, match="only 0 of .* drawn pairs have a target that differs"):
        pairs_from_task(NoChange(TASKS["prev_token"].config_cls(d_vocab=5, seq_len=4)), 8)


def test_pairs_from_task_without_corrupt_is_a_clear_error():
    with pytest.raises(PairsError, match="task 'brackets' offers no corrupt()"):
        pairs_from_task(make_task(TASKS["brackets"].config_cls()), 8)


# --- pairs from prompt strings ---------------------------------------------------------------------------
def test_pairs_from_prompts_with_multi_token_answers(icl):
    task, model = icl
    clean = [PROMPT, "g h i -> g ; j k l ->"]
    corrupted = ["a b c -> a ; d e f ->", "g h i -> i ; j k l ->"]
    pairs = pairs_from_prompts(model, clean, corrupted, [("f", "d"), ("j ; m", "l")])
    assert pairs.clean.tolist() == [[task.BOS] + ids(task, p) for p in clean]
    assert pairs.corrupted.tolist() == [[task.BOS] + ids(task, p) for p in corrupted]
    assert pairs.answer_pos.tolist() == [10, 10]  # the last of 11 positions
    f, d, j, semi, m, el = ids(task, "f d j ; m l")
    assert pairs.answers.tolist() == [[[f, -1, -1], [d, -1, -1]], [[j, semi, m], [el, -1, -1]]]
    assert pairs.str_tokens == ["BOS"] + PROMPT.split()
    same = pairs_from_prompts(model, clean, corrupted, ["f", "j ; m"], wrong_answers=["d", "l"])
    assert torch.equal(same.answers, pairs.answers)


def test_pairs_from_prompts_errors(icl):
    _, model = icl
    with pytest.raises(PairsError) as e:
        pairs_from_prompts(model, [PROMPT, PROMPT], [PROMPT, "a b c -> c ; d e ->"], [("f", "d")] * 2)
    assert "corrupted[1] has 10 tokens but clean[0] has 11" in str(e.value) and "same token length" in str(e.value)
    with pytest.raises(PairsError, match=r"clean\[0\]: unknown word 'zz'"):
        pairs_from_prompts(model, ["a zz"], ["a b"], [("c", "d")])
    with pytest.raises(PairsError, match=r"answers\[0\]='f': without wrong_answers each answer must be a"):
        pairs_from_prompts(model, [PROMPT], [PROMPT], ["f"])
    with pytest.raises(PairsError, match="lists of one length"):
        pairs_from_prompts(model, [PROMPT], [], [("f", "d")])
