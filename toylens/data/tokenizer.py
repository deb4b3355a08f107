"""A word-level tokenizer for a task's vocabulary (a ``PreTrainedTokenizerFast`` over its token names), so toy
models accept strings like pretrained ones. Details: docs/internals.md, "The toy tokenizer"."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.tokenization_utils_base import PaddingStrategy, TruncationStrategy

if TYPE_CHECKING:
    from toylens.data.base import Task

PAD = "<pad>"
_SHOW = 12  # vocabulary words listed in an error message (then "...")


class TokenizerError(ValueError):
    """A string the toy tokenizer cannot encode, or token names it cannot be built from."""


def _vocab_text(names: Sequence[str]) -> str:
    shown = " ".join(names[:_SHOW]) + (f" ... {names[-1]}" if len(names) > _SHOW else "")
    return f"{len(names)} words: {shown}"


def check_token_names(names: Sequence[str], bos: str | None = None) -> None:
    """Token names must be unique, non-empty and whitespace-free, and must not contain a special token."""
    for i, n in enumerate(names):
        if not isinstance(n, str) or not n or any(c.isspace() for c in n):
            raise TokenizerError(f"token_names[{i}]={n!r}: a word-level tokenizer needs non-empty names without "
                                 f"whitespace; rename it in the task's token_names")
        specials = [s for s in (PAD, bos) if s and s != n and s in n]
        if specials:
            raise TokenizerError(f"token_names[{i}]={n!r} contains the special token {specials[0]!r}, so strings "
                                 f"holding it would split wrongly; rename it in the task's token_names")
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            raise TokenizerError(f"token_names[{i}]={n!r} repeats token_names[{seen[n]}]; every token needs its "
                                 f"own name for strings to map to ids")
        seen[n] = i
    if PAD in seen:
        raise TokenizerError(f"token_names[{seen[PAD]}]={PAD!r} is reserved for padding; rename it")


class ToyTokenizer(PreTrainedTokenizerFast):
    """A HuggingFace fast tokenizer over ``token_names`` that refuses what it cannot encode exactly.

    ``token_names`` (the vocabulary, without ``<pad>``) and ``task_name`` (for messages) are
    attributes. Encoding checks every word first; TransformerLens's manual BOS prepending
    (``"BOS" + text``, no space) is recognised, and a text that already starts with BOS then is an
    error (it would silently become two BOS tokens).
    """

    token_names: list[str]
    task_name: str

    def _words(self, text: str) -> list[str]:
        bos = self.bos_token if self.bos_token in self.token_names else None
        prepended = False
        if self.bos_token and text.startswith(self.bos_token) and text[len(self.bos_token):][:1].strip():
            if bos is None:  # no BOS in this vocabulary: TransformerLens prepended the pad stand-in
                raise TokenizerError(f"the {self.task_name} vocabulary has no BOS token, so prepend_bos=True "
                                     f"cannot work; pass prepend_bos=False")
            prepended, text = True, text[len(bos):]
        words = text.split()
        if prepended and words[:1] == [bos]:
            raise TokenizerError(f"{text.strip()!r} already starts with {bos} and prepend_bos adds another one; "
                                 f"drop {bos} from the string or pass prepend_bos=False")
        vocab = set(self.token_names)
        for w in words:
            if w not in vocab:
                raise TokenizerError(f"unknown word {w!r} in {text.strip()!r}: the {self.task_name} vocabulary has "
                                     f"{_vocab_text(self.token_names)}; use those words, separated by spaces")
        return [bos] + words if prepended else words

    def _encode_plus(self, text, text_pair=None, **kwargs):
        if text_pair is not None or kwargs.get("is_split_into_words"):
            raise TokenizerError("the toy tokenizer encodes plain strings (or lists of them) only; "
                                 "pass text without text_pair / is_split_into_words")
        batched = isinstance(text, (list, tuple))
        texts = list(text) if batched else [text]
        if not all(isinstance(t, str) for t in texts):
            raise TokenizerError(f"expected a string or a list of strings, got {type(texts[0]).__name__}")
        words = [self._words(t) for t in texts]
        lengths = [len(w) for w in words]
        padding = kwargs.get("padding_strategy", PaddingStrategy.DO_NOT_PAD)
        if padding != PaddingStrategy.DO_NOT_PAD and len(set(lengths)) > 1:
            i = next(i for i, n in enumerate(lengths) if n != lengths[0])
            raise TokenizerError(f"strings [0] and [{i}] have {lengths[0]} and {lengths[i]} tokens: a toy model has "
                                 f"no padding token; tokenize them one at a time or make them the same length")
        max_length = kwargs.get("max_length")
        truncation = kwargs.get("truncation_strategy", TruncationStrategy.DO_NOT_TRUNCATE)
        if truncation != TruncationStrategy.DO_NOT_TRUNCATE and max_length is not None and max(lengths) > max_length:
            i = lengths.index(max(lengths))
            raise TokenizerError(f"string [{i}] has {lengths[i]} tokens, more than the {max_length} the model takes "
                                 f"(n_ctx); shorten it rather than have it truncated")
        joined = [" ".join(w) for w in words]
        return super()._encode_plus(joined if batched else joined[0], **kwargs)


def build_tokenizer(token_names: Sequence[str], bos: str | None = None, d_vocab: int | None = None,
                    task_name: str = "toy") -> ToyTokenizer:
    """A ``ToyTokenizer`` whose token ids are the positions in ``token_names``.

    ``bos``: the name of the BOS token (must be a token name) or None. ``d_vocab``: the model's
    vocabulary when it is larger than the names (extra ids get the names ``<unused{i}>``).
    ``<pad>`` gets the id just past the vocabulary.
    """
    names = list(token_names)
    if d_vocab is not None:
        if d_vocab < len(names):
            raise TokenizerError(f"d_vocab={d_vocab} is smaller than the {len(names)} token names; the model "
                                 f"cannot embed every token of the task")
        names += [f"<unused{i}>" for i in range(len(names), d_vocab)]
    check_token_names(names, bos)
    if bos is not None and bos not in names:
        raise TokenizerError(f"bos={bos!r} is not a token name; pass one of the names or None")
    vocab = {name: i for i, name in enumerate(names)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=None))  # unknown words are caught before this
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Without a BOS of its own the pad stands in (as TransformerLens would make it), so that an
    # explicit prepend_bos=True is a clear error rather than silently ignored.
    tok = ToyTokenizer(tokenizer_object=backend, bos_token=bos or PAD, pad_token=PAD, eos_token=PAD,
                       name_or_path=f"toylens/{task_name}", padding_side="right")
    tok.token_names, tok.task_name = names, task_name
    if tok.pad_token_id != len(names):  # the pad must never be an id a model can embed
        raise TokenizerError(f"internal: {PAD} got id {tok.pad_token_id}, expected {len(names)}")
    return tok


def task_bos(task: Task) -> str | None:
    """The name of the task's BOS token (``token_names[task.BOS]``), or None when it has none."""
    bos_id = getattr(task, "BOS", None)
    return task.token_names[bos_id] if isinstance(bos_id, int) else None


def task_tokenizer(task: Task, d_vocab: int | None = None) -> ToyTokenizer:
    """The tokenizer of ``task.token_names``, with the task's BOS (if any) as BOS."""
    return build_tokenizer(task.token_names, bos=task_bos(task), d_vocab=d_vocab, task_name=task.name)
