"""Sequence-to-sequence tasks ``[BOS, x_1..x_n, SEP, y_1..y_n]``: copy, reverse and sort.

The three differ only in how ``y`` is computed from ``x`` (``_answer``); everything else (layout,
teacher-forced targets, loss mask, whole-answer accuracy, corrupt) lives in ``_SeqToSeq``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from toylens.data.base import Batch, Task, TaskConfig, register_task
from toylens.data.tasks._common import next_token_targets, require, resample_different, symbol_names


@dataclass
class SeqToSeqConfig(TaskConfig):
    n_symbols: int = 20  # token ids 2..n_symbols+1 (0 is BOS, 1 is SEP)
    length: int = 8  # n: symbols in the input, and in the answer


@dataclass
class CopyConfig(SeqToSeqConfig):
    name: str = "copy"


@dataclass
class ReverseConfig(SeqToSeqConfig):
    name: str = "reverse"


@dataclass
class SortConfig(SeqToSeqConfig):
    name: str = "sort"


class _SeqToSeq(Task):
    """``[BOS, x_1..x_n, SEP, y_1..y_n]`` with ``x`` uniform over the symbols (with replacement).

    Teacher-forced: targets are the next token and ``loss_mask`` is true at the SEP position and at
    ``y_1..y_{n-1}``, i.e. exactly the positions whose next token is an answer token.
    """

    config_cls: ClassVar[type[SeqToSeqConfig]]
    BOS = 0
    SEP = 1
    FIRST_SYMBOL = 2

    def __init__(self, cfg: SeqToSeqConfig):
        require(cfg.n_symbols >= 2, "n_symbols", cfg.n_symbols, "must be at least 2; raise it")
        require(cfg.length >= 1, "length", cfg.length, "must be at least 1; raise it")
        super().__init__(cfg)

    def _answer(self, x: Tensor) -> Tensor:
        """The answer ``y`` for inputs ``x`` (both ``[batch, n]`` token ids)."""
        raise NotImplementedError

    @property
    def d_vocab(self) -> int:
        return self.cfg.n_symbols + self.FIRST_SYMBOL

    @property
    def seq_len(self) -> int:
        return 2 * self.cfg.length + 2

    @property
    def token_names(self) -> list[str]:
        return ["BOS", "SEP"] + symbol_names(self.cfg.n_symbols)

    def _build(self, x: Tensor) -> Batch:
        batch, n = x.shape
        tokens = torch.empty((batch, 2 * n + 2), dtype=x.dtype, device=x.device)
        tokens[:, 0] = self.BOS
        tokens[:, 1 : n + 1] = x
        tokens[:, n + 1] = self.SEP
        tokens[:, n + 2 :] = self._answer(x)
        loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
        loss_mask[:, n + 1 : 2 * n + 1] = True
        return Batch(tokens, next_token_targets(tokens), loss_mask)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        shape = (batch_size, self.cfg.length)
        x = torch.randint(
            self.FIRST_SYMBOL, self.d_vocab, shape, generator=generator, device=generator.device
        )
        return self._build(x)

    def corrupt(self, batch: Batch, generator: torch.Generator) -> Batch:
        """A fresh input whose every symbol differs from the clean one; the answer is recomputed.

        Targets follow the new input. For copy and reverse every answer token changes; for sort the
        answer changes unless the new multiset sorts to the same list (rare, not excluded).
        """
        x = batch.tokens[:, 1 : self.cfg.length + 1]
        return self._build(resample_different(x, self.FIRST_SYMBOL, self.d_vocab, generator))

    def accuracy(self, logits: Float[Tensor, "batch pos d_vocab"], batch: Batch) -> Tensor:
        """Fraction of sequences whose whole answer is right (every loss-masked position's argmax).

        Teacher-forced, so it checks each answer token given the correct earlier ones.
        """
        correct = (logits.argmax(-1) == batch.targets) | ~batch.loss_mask
        return correct.all(dim=1).float().mean()


@register_task
class Copy(_SeqToSeq):
    """``y = x``."""

    name = "copy"
    config_cls = CopyConfig

    def _answer(self, x: Tensor) -> Tensor:
        return x


@register_task
class Reverse(_SeqToSeq):
    """``y = x`` reversed."""

    name = "reverse"
    config_cls = ReverseConfig

    def _answer(self, x: Tensor) -> Tensor:
        return x.flip(1)


@register_task
class Sort(_SeqToSeq):
    """``y = x`` sorted ascending by token id (symbol ``a`` < ``b`` < ...), duplicates kept."""

    name = "sort"
    config_cls = SortConfig

    def _answer(self, x: Tensor) -> Tensor:
        return x.sort(dim=1).values
