"""Strings in, tokens and prompt pairs out: the toy tokenizer on a model, ``test_prompt``, pair constructors.

    model = attach_tokenizer(model, task)      # run.model() does this for you
    model.to_tokens("a b c -> c ; d e f ->")   # the task's BOS is prepended, as in training
    test_prompt(model, "a b c -> c ; d e f ->", "f").text()
    pairs = pairs_from_task(task, 200, seed=0)              # clean/corrupted from task.corrupt()
    pairs = pairs_from_prompts(model, ["12 x 34 ="], ["21 x 43 ="], [("408", "903")])

Everything works the same on toy models (with the attached word-level tokenizer) and on
pretrained models (``toylens.analyze.pretrained.load_pretrained``), which keep their own tokenizer.
Prompts that cannot be aligned (different token lengths) or encoded (unknown words, longer than
``n_ctx``) are a one-line ``PromptError``/``PairsError`` naming the prompt and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from toylens._compat import HookedTransformer
from toylens.analyze import plots
from toylens.analyze.pairs import PAD, PairsError, PromptPairs
from toylens.data.base import Batch, Task
from toylens.data.tasks.induction import Induction
from toylens.data.tokenizer import TokenizerError
from toylens.result import Result
from toylens.runs.run import ANALYSIS_SEED
from toylens.runs.tokenizer import PromptError, attach_tokenizer  # noqa: F401  (re-exported)

PAIRS_SEED = ANALYSIS_SEED + 2  # default seed of pairs_from_task: apart from the batch and reference seeds
_MAX_ROUNDS = 20  # pairs_from_task: draws of n rows before giving up on finding n usable pairs


def _require_tokenizer(model: HookedTransformer) -> None:
    if getattr(model, "tokenizer", None) is None:
        raise PromptError("model has no tokenizer: use run.model() (which attaches the task's) or "
                          "toylens.analyze.prompts.attach_tokenizer(model, task)")


def _tokens(model: HookedTransformer, text: str, what: str, prepend_bos: bool | None) -> Int[Tensor, " pos"]:
    """One string to a 1-D token tensor: never truncated, never longer than ``n_ctx``."""
    if not isinstance(text, str):
        raise PromptError(f"{what}={text!r}: expected a string")
    try:
        tokens = model.to_tokens(text, prepend_bos=prepend_bos, truncate=False)[0]
    except TokenizerError as e:
        raise PromptError(f"{what}: {e}") from None
    if tokens.numel() == 0:
        raise PromptError(f"{what}={text!r} has no tokens; give it at least one word")
    if tokens.numel() > model.cfg.n_ctx:
        raise PromptError(f"{what} has {tokens.numel()} tokens, more than the model's n_ctx={model.cfg.n_ctx}; "
                          f"shorten it")
    return tokens


# --- test_prompt --------------------------------------------------------------------------------
@dataclass
class PromptTest(Result):
    """How a model continues ``prompt`` with ``answer``, one answer token at a time (teacher forcing).

    Row ``i`` is the prediction of answer token ``i`` from the prompt plus answer tokens ``< i``.
    ``ranks``: 0 for the most likely token (ties count in the answer's favour). ``text()`` prints
    what ``transformer_lens.utils.test_prompt`` prints, in the same format.
    """

    prompt: str
    answer: str
    prompt_str_tokens: list[str]
    answer_str_tokens: list[str]
    answer_tokens: Int[Tensor, " answer_token"]
    ranks: Int[Tensor, " answer_token"]
    answer_logits: Float[Tensor, " answer_token"]
    answer_probs: Float[Tensor, " answer_token"]
    top_tokens: Int[Tensor, "answer_token top_k"]
    top_str_tokens: list[list[str]]
    top_logits: Float[Tensor, "answer_token top_k"]
    top_probs: Float[Tensor, "answer_token top_k"]

    def text(self) -> str:
        lines = [f"Tokenized prompt: {self.prompt_str_tokens}", f"Tokenized answer: {self.answer_str_tokens}"]
        for i, tok in enumerate(self.answer_str_tokens):
            lines.append("Performance on answer token:")
            lines.append(f"Rank: {int(self.ranks[i]): <8} Logit: {self.answer_logits[i].item():5.2f} "
                         f"Prob: {self.answer_probs[i].item():6.2%} Token: |{tok}|")
            for j, top in enumerate(self.top_str_tokens[i]):
                lines.append(f"Top {j}th token. Logit: {self.top_logits[i, j].item():5.2f} "
                             f"Prob: {self.top_probs[i, j].item():6.2%} Token: |{top}|")
        ranks = [(tok, int(r)) for tok, r in zip(self.answer_str_tokens, self.ranks, strict=True)]
        lines.append(f"Ranks of the answer tokens: {ranks}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()

    def figures(self) -> dict:
        figs = {}
        for i, tok in enumerate(self.answer_str_tokens):
            figs[f"test_prompt/answer{i}"] = plots.bar(
                self.top_probs[i], labels=plots._unique(self.top_str_tokens[i]), xaxis="token", yaxis="probability",
                title=f"answer token {i} {tok!r}: rank {int(self.ranks[i])}, p={self.answer_probs[i].item():.3f}")
        return figs


@torch.no_grad()
def test_prompt(model: HookedTransformer, prompt: str, answer: str, top_k: int = 10,
                prepend_bos: bool | None = None, prepend_space_to_answer: bool = True) -> PromptTest:
    """Top-k next tokens, and the rank/logit/probability of each token of ``answer`` after ``prompt``.

    As ``transformer_lens.utils.test_prompt`` (whose printout ``.text()`` reproduces), but returned:
    the answer is tokenized without BOS (with a leading space unless ``prepend_space_to_answer`` is
    False or it has one) and appended to the prompt; answer token ``i`` is scored at the position
    before it. ``prepend_bos=None`` uses the model's default.
    """
    _require_tokenizer(model)
    if not isinstance(answer, str):
        raise PromptError(f"answer={answer!r}: expected one string (a multi-token answer is one string)")
    if top_k < 1:
        raise PromptError(f"top_k={top_k} must be at least 1")
    if prepend_space_to_answer and not answer.startswith(" "):
        answer = " " + answer
    prompt_tokens = _tokens(model, prompt, "prompt", prepend_bos)
    answer_tokens = _tokens(model, answer, "answer", False)
    n_prompt, k = prompt_tokens.numel(), answer_tokens.numel()
    if n_prompt + k - 1 > model.cfg.n_ctx:
        raise PromptError(f"prompt ({n_prompt} tokens) plus answer ({k}) need {n_prompt + k - 1} positions, more "
                          f"than n_ctx={model.cfg.n_ctx}; shorten the prompt")
    tokens = torch.cat([prompt_tokens, answer_tokens])[None, :-1]  # the last answer token predicts nothing
    logits = model(tokens, return_type="logits")[0, n_prompt - 1:].float()  # [answer_token, d_vocab]
    probs = logits.softmax(-1)
    top_k = min(top_k, logits.shape[-1])
    top_probs, top_tokens = probs.topk(top_k, dim=-1)
    idx = torch.arange(k, device=logits.device)
    answer_logits = logits[idx, answer_tokens]
    return PromptTest(
        prompt=prompt, answer=answer,
        prompt_str_tokens=model.to_str_tokens(prompt_tokens),
        answer_str_tokens=model.to_str_tokens(answer_tokens),
        answer_tokens=answer_tokens.cpu(),
        ranks=(logits > answer_logits[:, None]).sum(-1).cpu(),
        answer_logits=answer_logits.cpu(), answer_probs=probs[idx, answer_tokens].cpu(),
        top_tokens=top_tokens.cpu(), top_str_tokens=[model.to_str_tokens(row) for row in top_tokens],
        top_logits=logits.gather(-1, top_tokens).cpu(), top_probs=top_probs.cpu(),
    )


test_prompt.__test__ = False  # a library function named test_*: not for pytest to collect


# --- pairs from a task ----------------------------------------------------------------------------
def _last_differing_target(clean: Batch, corrupted: Batch) -> tuple[Tensor, Tensor, Tensor]:
    """Per row: the last loss-masked position whose target differs, the clean and the corrupted target
    there, and whether the row has such a position."""
    differ = clean.loss_mask & corrupted.loss_mask & (clean.targets != corrupted.targets)
    pos = torch.arange(clean.tokens.shape[1], device=differ.device).expand_as(differ)
    last = torch.where(differ, pos, -1).max(dim=1).values
    ok = last >= 0
    at = last.clamp(min=0)[:, None]
    return last.clamp(min=0), torch.stack([clean.targets.gather(1, at)[:, 0],
                                            corrupted.targets.gather(1, at)[:, 0]], dim=1), ok


def _induction_contrast(task: Induction, clean: Batch, corrupted: Batch) -> tuple[Tensor, Tensor, Tensor]:
    """Induction's corrupt() keeps the repeat and its targets; what changes is the token that induction
    would copy: at each row's last predicted position ``p`` it is the token after the previous occurrence
    of ``tokens[p]`` before the repeat (``p - L + 1`` in the fixed layout), the clean target in the clean
    run and a different token in the corrupted one (Induction.corrupt)."""
    mask, tokens = clean.loss_mask, clean.tokens
    cols = torch.arange(tokens.shape[1], device=tokens.device)
    p = torch.where(mask, cols, -1).amax(1)  # the last predicted position
    second = mask.long().argmax(1)  # where the repeat starts
    rows = torch.arange(len(clean), device=tokens.device)
    earlier = (tokens == tokens[rows, p][:, None]) & (cols < second[:, None])
    src = torch.where(earlier, cols, -1).amax(1) + 1  # after the last earlier occurrence
    answers = torch.stack([tokens[rows, src], corrupted.tokens[rows, src]], dim=1)
    return p, answers, (answers[:, 0] != answers[:, 1]) & (src > 0)


# Tasks whose corrupt() does not change the targets say here what the contrast is; every other task
# uses the last loss-masked position where the clean and corrupted targets differ.
_CONTRASTS = {Induction: _induction_contrast}


def pairs_from_task(task: Task, n: int, seed: int = PAIRS_SEED, device: str | torch.device = "cpu") -> PromptPairs:
    """``n`` clean/corrupted pairs from ``task.sample`` and ``task.corrupt`` (sampled on the CPU with
    ``seed``, then moved: the same pairs on every device).

    ``answer_pos``: per row, the last loss-masked position whose target differs between the clean and
    the corrupted sequence (icl: the final ``->``; modular_add: ``=``; copy/reverse/sort: the last
    answer position; prev_token: the last position), with ``answers[:, 0]`` the clean target and
    ``answers[:, 1]`` the corrupted one there. Induction, whose corrupt() keeps the targets: the last
    repeated position, answers the clean target and the token the corrupted first half puts after the
    same symbol. Rows where nothing differs (rare: e.g. sort of a permuted multiset) are skipped and
    more rows are drawn.
    """
    if not isinstance(n, int) or n < 1:
        raise PairsError(f"n={n!r} must be a positive number of prompt pairs")
    contrast = next((f for cls, f in _CONTRASTS.items() if isinstance(task, cls)), None)
    gen = torch.Generator("cpu").manual_seed(seed)
    parts: list[tuple[Tensor, ...]] = []
    have = 0
    for _ in range(_MAX_ROUNDS):
        clean = task.sample(n, gen)
        try:
            corrupted = task.corrupt(clean, gen)
        except NotImplementedError as e:  # no corrupt(), or the task says why it cannot pair (a tiny file)
            why = " ".join(str(e).split()) or f"task {task.name!r} offers no corrupt()"
            raise PairsError(f"{why}, so there are no clean/corrupted pairs; write the prompts yourself "
                             f"(pairs_from_prompts) or use a task with corrupt()") from None
        pos, answers, ok = (contrast(task, clean, corrupted) if contrast
                            else _last_differing_target(clean, corrupted))
        parts.append((clean.tokens[ok], corrupted.tokens[ok], pos[ok], answers[ok]))
        have += int(ok.sum())
        if have >= n:
            break
    else:
        raise PairsError(f"task {task.name!r}: only {have} of {_MAX_ROUNDS * n} drawn pairs have a target that "
                         f"differs between clean and corrupted; check the task's corrupt()")
    clean_t, corrupt_t, pos_t, ans_t = (torch.cat(x)[:n] for x in zip(*parts, strict=True))
    names = task.token_names
    return PromptPairs(clean_t, corrupt_t, pos_t, ans_t[:, :, None].clone(),
                       str_tokens=[names[i] for i in clean_t[0].tolist()]).to(device)


# --- pairs from prompt strings ------------------------------------------------------------------
def pairs_from_prompts(model: HookedTransformer, clean: Sequence[str], corrupted: Sequence[str],
                       answers: Sequence[str | tuple[str, str]], wrong_answers: Sequence[str] | None = None,
                       prepend_bos: bool | None = None) -> PromptPairs:
    """Clean/corrupted pairs from strings, scored at the last position of each prompt.

    ``answers[i]``: the correct answer of ``clean[i]``, with ``wrong_answers[i]`` the incorrect one,
    or a ``(correct, incorrect)`` tuple when ``wrong_answers`` is None. Answers are tokenized as
    written (no BOS, no added space: GPT-2 wants ``" 408"``) and may be several tokens, padded with
    -1. Every prompt, clean and corrupted, must have the same number of tokens: patching swaps
    activations position by position, so a different length is an error naming the prompt.
    """
    _require_tokenizer(model)
    clean, corrupted = list(clean), list(corrupted)
    if not clean:
        raise PairsError("clean: no prompts given; pass at least one clean prompt")
    if len(corrupted) != len(clean) or len(answers) != len(clean):
        raise PairsError(f"clean, corrupted and answers must be lists of one length; got {len(clean)}, "
                         f"{len(corrupted)} and {len(answers)}")
    if wrong_answers is None:
        bad = next((i for i, a in enumerate(answers) if not (isinstance(a, (tuple, list)) and len(a) == 2)), None)
        if bad is not None:
            raise PairsError(f"answers[{bad}]={answers[bad]!r}: without wrong_answers each answer must be a "
                             f"(correct, incorrect) pair; pass wrong_answers=[...] or pairs")
        pairs = [(a[0], a[1]) for a in answers]
    else:
        if len(wrong_answers) != len(clean):
            raise PairsError(f"wrong_answers has {len(wrong_answers)} entries for {len(clean)} prompts; one each")
        pairs = list(zip(answers, wrong_answers, strict=True))

    def encode(text, what, bos):
        try:
            return _tokens(model, text, what, bos)
        except PromptError as e:
            raise PairsError(str(e)) from None

    rows = {"clean": [encode(p, f"clean[{i}]", prepend_bos) for i, p in enumerate(clean)],
            "corrupted": [encode(p, f"corrupted[{i}]", prepend_bos) for i, p in enumerate(corrupted)]}
    n_pos = rows["clean"][0].numel()
    for name, toks in rows.items():
        for i, t in enumerate(toks):
            if t.numel() != n_pos:
                raise PairsError(f"{name}[{i}] has {t.numel()} tokens but clean[0] has {n_pos}: patching aligns "
                                 f"positions, so every prompt needs the same token length; reword {name}[{i}] "
                                 f"(model.to_str_tokens shows the split)")
    ans = [[encode(a, f"{kind}[{i}]", False) for kind, a in zip(("answers", "wrong_answers"), pair, strict=True)]
           for i, pair in enumerate(pairs)]
    k = max(t.numel() for pair in ans for t in pair)
    device = rows["clean"][0].device
    answer_t = torch.full((len(clean), 2, k), PAD, dtype=torch.long, device=device)
    for i, pair in enumerate(ans):
        for j, t in enumerate(pair):
            answer_t[i, j, :t.numel()] = t
    return PromptPairs(
        clean=torch.stack(rows["clean"]), corrupted=torch.stack(rows["corrupted"]),
        answer_pos=torch.full((len(clean),), n_pos - 1, dtype=torch.long, device=device),
        answers=answer_t, str_tokens=model.to_str_tokens(rows["clean"][0]))
