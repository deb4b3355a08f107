"""Induction: ``[BOS, x_1..x_L, x_1..x_L]``; in the repeat, predict the token that followed last time."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toylens.data.base import Batch, Task, TaskConfig, register_task
from toylens.data.tasks._common import next_token_targets, require, resample_different, symbol_names


@dataclass
class InductionConfig(TaskConfig):
    name: str = "induction"
    n_symbols: int = 50  # token ids 1..n_symbols (0 is BOS)
    half_len: int = 24  # L: the random half that is then repeated


@register_task
class Induction(Task):
    """Tokens ``[BOS, x_1..x_L, x_1..x_L]`` with ``x`` uniform (with replacement) over the symbols.

    Targets are the next token; ``loss_mask`` is true at positions ``L+1 .. 2L-1`` (inputs
    ``x_1..x_{L-1}`` of the repeat), exactly where induction predicts the next token.
    """

    name = "induction"
    config_cls = InductionConfig
    BOS = 0

    def __init__(self, cfg: InductionConfig):
        require(cfg.n_symbols >= 2, "n_symbols", cfg.n_symbols, "must be at least 2; raise it")
        require(
            cfg.half_len >= 2,
            "half_len",
            cfg.half_len,
            "must be at least 2 (the repeat needs one predictable token); raise it",
        )
        super().__init__(cfg)

    @property
    def d_vocab(self) -> int:
        return self.cfg.n_symbols + 1

    @property
    def seq_len(self) -> int:
        return 1 + 2 * self.cfg.half_len

    @property
    def token_names(self) -> list[str]:
        return ["BOS"] + symbol_names(self.cfg.n_symbols)

    def _build(self, first: torch.Tensor, second: torch.Tensor) -> Batch:
        bos = torch.full((first.shape[0], 1), self.BOS, dtype=first.dtype, device=first.device)
        tokens = torch.cat([bos, first, second], dim=1)
        loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
        half = self.cfg.half_len
        loss_mask[:, half + 1 : 2 * half] = True
        return Batch(tokens, next_token_targets(tokens), loss_mask)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        shape = (batch_size, self.cfg.half_len)
        x = torch.randint(1, self.cfg.n_symbols + 1, shape, generator=generator, device=generator.device)
        return self._build(x, x)

    def corrupt(self, batch: Batch, generator: torch.Generator) -> Batch:
        """A fresh random first half (every token differs from the clean one), the same second half.

        The repeat, ``loss_mask`` and the targets at the masked positions are unchanged: they are
        the true next tokens of the corrupted sequence, which induction no longer predicts (the
        first half that would give them away is gone): the token after the same position of the
        corrupted first half, the induction "answer", differs from the target at every masked
        position. (Targets inside the first half follow its new tokens; they are masked out.)
        """
        half = self.cfg.half_len
        first = batch.tokens[:, 1 : half + 1]
        fresh = resample_different(first, 1, self.cfg.n_symbols + 1, generator)
        return self._build(fresh, batch.tokens[:, half + 1 :])
