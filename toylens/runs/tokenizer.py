"""The toy word-level tokenizer attached to a run's model, so prompts can be written as strings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from toylens.data.tokenizer import TokenizerError, task_bos, task_tokenizer

if TYPE_CHECKING:
    from toylens._compat import HookedTransformer
    from toylens.data.base import Task


class PromptError(ValueError):
    """A prompt or answer that cannot be used as given; the message names it and the fix."""


def attach_tokenizer(model: HookedTransformer, task: Task) -> HookedTransformer:
    """Give a toy model the word-level tokenizer of ``task`` (in place; returns the model).

    ``to_tokens``/``to_str_tokens``/``to_string`` then work on strings of token names. When the
    task has a BOS token it is prepended by default (``cfg.default_prepend_bos``), as every
    training sequence starts with it; ``prepend_bos=False`` gives exactly the written words.

    TransformerLens's ``set_tokenizer`` is not used: it reloads any tokenizer that has a BOS from
    the Hub by name (``get_tokenizer_with_bos``) and names missing pad/eos tokens
    ``<|endoftext|>`` with no id. This sets the fields it would set.
    """
    try:
        tok = task_tokenizer(task, d_vocab=model.cfg.d_vocab)
    except TokenizerError as e:
        raise PromptError(f"task {task.name!r} and this model (d_vocab={model.cfg.d_vocab}) do not fit: {e}") from None
    model.tokenizer = tok
    model.cfg.tokenizer_prepends_bos = False  # BOS is prepended by TransformerLens, not by the tokenizer
    model.cfg.default_prepend_bos = task_bos(task) is not None
    return model
