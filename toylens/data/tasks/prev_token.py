"""Seed 004's task: BOS (token 0) then uniform tokens; at position i predict token i-1."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toylens.data.base import Batch, Task, TaskConfig, register_task


@dataclass
class PrevTokenConfig(TaskConfig):
    name: str = "prev_token"
    d_vocab: int = 300  # including BOS = 0
    seq_len: int = 50


@register_task
class PrevToken(Task):
    name = "prev_token"
    config_cls = PrevTokenConfig
    BOS = 0

    def __init__(self, cfg: PrevTokenConfig):
        if cfg.d_vocab < 3:
            raise ValueError(f"task.d_vocab={cfg.d_vocab} must be at least 3 (BOS plus two symbols)")
        if cfg.seq_len < 2:
            raise ValueError(f"task.seq_len={cfg.seq_len} must be at least 2 (BOS plus one token)")
        super().__init__(cfg)

    @property
    def d_vocab(self) -> int:
        return self.cfg.d_vocab

    @property
    def seq_len(self) -> int:
        return self.cfg.seq_len

    @property
    def token_names(self) -> list[str]:
        return ["BOS"] + [str(i) for i in range(1, self.cfg.d_vocab)]

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        dev = generator.device
        tokens = torch.randint(
            1, self.cfg.d_vocab, (batch_size, self.cfg.seq_len), generator=generator, device=dev
        )
        tokens[:, 0] = self.BOS
        targets = torch.zeros_like(tokens)
        targets[:, 1:] = tokens[:, :-1]
        loss_mask = torch.ones_like(tokens, dtype=torch.bool)
        loss_mask[:, 0] = False
        return Batch(tokens, targets, loss_mask)

    def corrupt(self, batch: Batch, generator: torch.Generator) -> Batch:
        """Fresh random tokens at every non-BOS position (so every answer changes in distribution)."""
        return self.sample(len(batch), generator)
