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
from toylens.data.tasks._common import (
    check_split_sides,
    draw_from_split,
    next_token_targets,
    require,
    resample_different,
    symbol_names,
)


@dataclass
class SeqToSeqConfig(TaskConfig):
    n_symbols: int = 20  # token ids 2..n_symbols+1 (0 is BOS, 1 is SEP)
    length: int = 8  # n: symbols in the input, and in the answer
    frac_train: float | None = 0.8  # share of all inputs trained on; the rest is held out. null: no split
    split_seed: int = 0  # which inputs are held out; independent of the run's seed


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

    Fixed split (``frac_train``, default 0.8): an input ``x`` is held out iff a fixed hash of ``x`` and
    ``split_seed`` (``_common.split_u``) is ``>= frac_train``. ``sample`` draws training inputs only,
    ``eval_set`` held-out inputs only (rows redrawn until on their side), so no held-out input is ever
    trained on, also when the input space is small (short sorts: 20^3 = 8,000 inputs at length 3).
    """

    config_cls: ClassVar[type[SeqToSeqConfig]]
    BOS = 0
    SEP = 1
    FIRST_SYMBOL = 2

    def __init__(self, cfg: SeqToSeqConfig):
        require(cfg.n_symbols >= 2, "n_symbols", cfg.n_symbols, "must be at least 2; raise it")
        require(cfg.length >= 1, "length", cfg.length, "must be at least 1; raise it")
        f = cfg.frac_train
        require(f is None or 0 < f < 1, "frac_train", f, "must be in (0, 1), or null for no split")
        if f is not None and cfg.n_symbols**cfg.length <= 2**16:  # small enough to list every input
            codes = torch.arange(cfg.n_symbols**cfg.length)
            digits = codes[:, None] // cfg.n_symbols ** torch.arange(cfg.length) % cfg.n_symbols
            check_split_sides(self.name, digits + self.FIRST_SYMBOL, torch.zeros_like(codes), f, cfg.split_seed)
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

    def _inputs(self, batch_size: int, generator: torch.Generator, held_out: bool | None) -> Tensor:
        def draw(rows: Tensor) -> Tensor:
            shape = (len(rows), self.cfg.length)
            return torch.randint(self.FIRST_SYMBOL, self.d_vocab, shape, generator=generator, device=generator.device)

        if held_out is None or self.cfg.frac_train is None:
            return draw(torch.arange(batch_size))
        return draw_from_split(draw, batch_size, generator.device, held_out, self.cfg.frac_train, self.cfg.split_seed)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """Training inputs (any inputs when ``frac_train`` is null)."""
        return self._build(self._inputs(batch_size, generator, held_out=False))

    def eval_set(self, size: int, seed: int, device: torch.device | str = "cpu") -> Batch:
        """``size`` held-out inputs, fixed by ``seed`` (any inputs when ``frac_train`` is null)."""
        gen = torch.Generator(device=device).manual_seed(seed)
        return self._build(self._inputs(size, gen, held_out=True))

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
