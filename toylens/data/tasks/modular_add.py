"""Modular addition ``[a, b, =]`` -> ``(a + b) mod p``, predicted at the ``=`` position only."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toylens.data.base import Batch, Task, TaskConfig, register_task
from toylens.data.tasks._common import require, resample_different


@dataclass
class ModularAddConfig(TaskConfig):
    name: str = "modular_add"
    p: int = 113  # the modulus; token ids 0..p-1 are the numbers, p is "="


@register_task
class ModularAdd(Task):
    """Tokens ``[a, b, =]`` with ``a, b`` uniform in ``[0, p)``; the target at ``=`` is ``(a+b) % p``.

    ``loss_mask`` is true at the last position only; the other targets are 0 (masked out).
    """

    name = "modular_add"
    config_cls = ModularAddConfig

    def __init__(self, cfg: ModularAddConfig):
        require(cfg.p >= 2, "p", cfg.p, "must be at least 2 (113, a prime, is the usual choice)")
        super().__init__(cfg)

    @property
    def EQ(self) -> int:  # noqa: N802 (a token id, named like the other tasks' constants)
        return self.cfg.p

    @property
    def d_vocab(self) -> int:
        return self.cfg.p + 1

    @property
    def seq_len(self) -> int:
        return 3

    @property
    def token_names(self) -> list[str]:
        return [str(i) for i in range(self.cfg.p)] + ["="]

    def _build(self, a: torch.Tensor, b: torch.Tensor) -> Batch:
        tokens = torch.stack([a, b, torch.full_like(a, self.EQ)], dim=1)
        targets = torch.zeros_like(tokens)
        targets[:, 2] = (a + b) % self.cfg.p
        loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
        loss_mask[:, 2] = True
        return Batch(tokens, targets, loss_mask)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        ab = torch.randint(0, self.cfg.p, (2, batch_size), generator=generator, device=generator.device)
        return self._build(ab[0], ab[1])

    def corrupt(self, batch: Batch, generator: torch.Generator) -> Batch:
        """``a`` resampled to a different number (``b`` kept), so every answer changes."""
        a = resample_different(batch.tokens[:, 0], 0, self.cfg.p, generator)
        return self._build(a, batch.tokens[:, 1])
