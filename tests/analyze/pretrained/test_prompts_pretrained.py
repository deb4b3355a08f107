"""test_prompt and pairs_from_prompts on a pretrained model (the tiny GPT-2), as seed 003 uses them."""

from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch

from toylens.analyze.pairs import PairsError
from toylens.analyze.prompts import pairs_from_prompts, test_prompt

PROMPT = "6 8 0 6 7 x 4 4 0 8 6 ="  # seed 003's multiplication, one digit per token here


def tl_printout(model, prompt, answer, **kw) -> list[str]:
    """The words TransformerLens prints (rich wraps lines at the terminal width, so not its lines)."""
    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
        warnings.simplefilter("ignore", DeprecationWarning)
        import transformer_lens.utils as tl_utils

        tl_utils.test_prompt(prompt, answer, model, **kw)
    return buf.getvalue().split()


@pytest.mark.parametrize("answer,kw", [("3 0 0 0 8", dict(prepend_bos=True)), ("road", dict(top_k=3))])
def test_test_prompt_prints_what_transformer_lens_prints(tiny_gpt2, answer, kw):
    _, model = tiny_gpt2
    ours = test_prompt(model, PROMPT, answer, **kw)
    assert ours.text().split() == tl_printout(model, PROMPT, answer, **kw)
    assert ours.prompt_str_tokens[0] == "<|endoftext|>" and len(ours.answer_str_tokens) == len(answer.split())
    # rank 0 is the argmax; the probabilities are the model's softmax at the positions before each token
    tokens = torch.cat([model.to_tokens(PROMPT)[0], ours.answer_tokens])
    with torch.no_grad():
        probs = model(tokens[None])[0].softmax(-1)
    n = len(PROMPT.split()) + 1
    for i, t in enumerate(ours.answer_tokens.tolist()):
        row = probs[n - 1 + i]
        assert int(ours.ranks[i]) == int((row > row[t]).sum())
        assert abs(float(ours.answer_probs[i]) - float(row[t])) < 1e-6


def test_pairs_from_prompts_on_gpt2(tiny_gpt2):
    _, model = tiny_gpt2
    clean = ["1 2 x 3 4 =", "5 6 x 7 8 ="]
    corrupted = ["3 4 x 1 2 =", "7 8 x 5 6 ="]
    pairs = pairs_from_prompts(model, clean, corrupted, [" 4 0 8", " 4 3 6 8"], wrong_answers=[" 4 0 9", " 4 3 6 7"])
    assert pairs.clean.tolist() == model.to_tokens(clean).tolist()  # BOS first: the model's default
    assert pairs.corrupted.tolist() == model.to_tokens(corrupted).tolist()
    assert pairs.answer_pos.tolist() == [6, 6] and pairs.answers.shape == (2, 2, 4)
    four, zero, eight, nine = (model.to_single_token(t) for t in "4089")
    assert pairs.answers[0].tolist() == [[four, zero, eight, -1], [four, zero, nine, -1]]
    assert (pairs.answers[1] != -1).all() and pairs.str_tokens == model.to_str_tokens(clean[0])
    with pytest.raises(PairsError, match=r"clean\[1\] has 8 tokens but clean\[0\] has 7"):
        pairs_from_prompts(model, [clean[0], "1 2 3 x 4 5 ="], corrupted, [("4", "5")] * 2)
