"""The toy word-level tokenizer: exact round trips for every task, and errors instead of silent UNK/pad/truncation."""

from __future__ import annotations

import pytest
import torch

from toylens.data import TASKS, make_task
from toylens.data.tokenizer import PAD, TokenizerError, build_tokenizer, check_token_names, task_bos, task_tokenizer

BOS_LESS = {"modular_add", "sequences"}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_vocabulary_round_trips(name, tmp_path):
    if name == "sequences":  # the user's own file: symbols of a text file
        (tmp_path / "s.txt").write_text("a b c d\nd c b a\nb b a c\nc a d b\n")
        task = make_task(TASKS[name].config_cls(path=str(tmp_path / "s.txt"), frac_train=0.5))
    else:
        task = make_task(TASKS[name].config_cls())
    tok = task_tokenizer(task)
    names = task.token_names
    assert len(tok) == task.d_vocab + 1 and tok.pad_token_id == task.d_vocab  # pad: just past the vocabulary
    assert tok.convert_ids_to_tokens(list(range(task.d_vocab))) == names
    rows = task.sample(4, torch.Generator().manual_seed(0)).tokens.tolist()
    rows.append(list(range(task.d_vocab)))  # every token once
    for row in rows:
        text = " ".join(names[i] for i in row)
        assert tok(text)["input_ids"] == row  # no BOS added by the tokenizer itself
        assert tok.decode(row) == text
        assert tok.batch_decode([[i] for i in row]) == [names[i] for i in row]
    assert (task_bos(task) is None) == (name in BOS_LESS)
    if name not in BOS_LESS:
        assert tok.bos_token == names[task.BOS] and tok.bos_token_id == task.BOS


def test_unknown_word_names_the_word_and_the_vocabulary():
    tok = task_tokenizer(make_task(TASKS["icl"].config_cls()))
    with pytest.raises(TokenizerError) as e:
        tok("a b zz -> c")
    msg = str(e.value)
    assert "'zz'" in msg and "icl vocabulary" in msg and "BOS -> ; a b" in msg and "\n" not in msg
    with pytest.raises(TokenizerError, match=r"unknown word '<pad>'"):
        tok("a <pad>")


def test_no_silent_padding_or_truncation():
    tok = task_tokenizer(make_task(TASKS["icl"].config_cls()))
    assert tok(["a b", "c d"], padding=True)["input_ids"] == [[3, 4], [5, 6]]
    with pytest.raises(TokenizerError, match=r"strings \[0\] and \[1\] have 2 and 1 tokens"):
        tok(["a b", "c"], padding=True)
    assert tok("a b c", truncation=True, max_length=3)["input_ids"] == [3, 4, 5]
    with pytest.raises(TokenizerError, match=r"string \[0\] has 4 tokens, more than the 3"):
        tok("a b c d", truncation=True, max_length=3)


def test_transformer_lens_manual_bos_prepending():
    # TransformerLens prepends BOS as text: bos_token + prompt, without a space.
    tok = task_tokenizer(make_task(TASKS["icl"].config_cls()))
    assert tok("BOS" + "a b")["input_ids"] == [0, 3, 4]
    assert tok("BOS a b")["input_ids"] == [0, 3, 4]  # written by the user, no prepending
    with pytest.raises(TokenizerError, match="already starts with BOS and prepend_bos adds another"):
        tok("BOS" + "BOS a b")
    no_bos = task_tokenizer(make_task(TASKS["modular_add"].config_cls(p=7)))
    assert no_bos("1 2 =")["input_ids"] == [1, 2, 7]
    with pytest.raises(TokenizerError, match="has no BOS token, so prepend_bos=True cannot work"):
        no_bos(no_bos.bos_token + "1 2 =")


def test_larger_model_vocabulary_gets_unused_names():
    tok = build_tokenizer(["BOS", "x", "y"], bos="BOS", d_vocab=5)
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["BOS", "x", "y", "<unused3>", "<unused4>"]
    assert tok.pad_token_id == 5 and tok("x <unused4>")["input_ids"] == [1, 4]
    with pytest.raises(TokenizerError, match="d_vocab=2 is smaller than the 3 token names"):
        build_tokenizer(["BOS", "x", "y"], d_vocab=2)


@pytest.mark.parametrize("names,bos,match", [
    (["a", "b", "a"], None, r"token_names\[2\]='a' repeats token_names\[0\]"),
    (["a", "b c"], None, r"token_names\[1\]='b c': .* without whitespace"),
    (["a", ""], None, r"token_names\[1\]='': .* non-empty"),
    (["a", PAD], None, r"token_names\[1\]='<pad>' contains the special token|is reserved"),
    (["BOS", "xBOS"], "BOS", r"token_names\[1\]='xBOS' contains the special token 'BOS'"),
])
def test_bad_token_names_are_one_line_errors(names, bos, match):
    with pytest.raises(TokenizerError, match=match) as e:
        check_token_names(names, bos)
    assert "\n" not in str(e.value)


def test_bos_must_be_a_token_name():
    with pytest.raises(TokenizerError, match="bos='S' is not a token name"):
        build_tokenizer(["a", "b"], bos="S")
