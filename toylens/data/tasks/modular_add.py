"""Modular addition ``[a, b, =]`` -> ``(a + b) mod p`` on a fixed train/held-out split of the p² pairs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toylens.data.base import Batch, Task, TaskConfig, register_task
from toylens.data.tasks._common import require, resample_different


@dataclass
class ModularAddConfig(TaskConfig):
    name: str = "modular_add"
    p: int = 113  # the modulus; token ids 0..p-1 are the numbers, p is "="
    frac_train: float = 0.3  # share of the p² pairs trained on (Nanda et al.: 0.3); the rest is held out
    split_seed: int = 0  # which pairs are held out; independent of the run's seed
    full_batch: bool = True  # train on every training pair each step (train.batch_size is then unused)


@register_task
class ModularAdd(Task):
    """Tokens ``[a, b, =]``; the target at ``=`` is ``(a+b) % p``. ``loss_mask`` is true at ``=`` only.

    Fixed split: the p² pairs are permuted by a generator seeded with ``split_seed`` (nothing else);
    the first ``round(frac_train * p²)`` are the training pairs, all others the held-out pairs. So
    the two are disjoint by construction and the same on every run, resume and machine. Training
    batches (``train_batch``) are all training pairs in a fixed order when ``full_batch`` (the
    default), else ``batch_size`` of them drawn without replacement; ``sample`` draws training pairs
    uniformly; ``eval_set`` is the held-out pairs (the first ``size`` of them in the fixed order,
    so ``size >= p² - n_train`` gives all of them); ``train_set`` is every training pair.
    """

    name = "modular_add"
    config_cls = ModularAddConfig

    def __init__(self, cfg: ModularAddConfig):
        require(cfg.p >= 2, "p", cfg.p, "must be at least 2 (113, a prime, is the usual choice)")
        n = round(cfg.frac_train * cfg.p**2)
        require(0 < cfg.frac_train < 1 and 0 < n < cfg.p**2, "frac_train", cfg.frac_train,
                f"must leave at least one of the {cfg.p**2} pairs on each side; choose a value in (0, 1), e.g. 0.3")
        super().__init__(cfg)
        self.n_train = n
        gen = torch.Generator().manual_seed(cfg.split_seed)
        order = torch.randperm(cfg.p**2, generator=gen)
        self._pairs = {"train": order[:n], "test": order[n:]}  # pair index a * p + b, on the CPU
        self._cache: dict = {}

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

    def split_pairs(self, split: str) -> torch.Tensor:
        """``[n, 2]`` pairs ``(a, b)`` of the ``"train"`` or ``"test"`` split, in the split's fixed order."""
        idx = self._pairs[split]
        return torch.stack([idx // self.cfg.p, idx % self.cfg.p], dim=1)

    def _build(self, a: torch.Tensor, b: torch.Tensor) -> Batch:
        tokens = torch.stack([a, b, torch.full_like(a, self.EQ)], dim=1)
        targets = torch.zeros_like(tokens)
        targets[:, 2] = (a + b) % self.cfg.p
        loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
        loss_mask[:, 2] = True
        return Batch(tokens, targets, loss_mask)

    def _split_batch(self, split: str, device) -> Batch:
        key = (split, str(device))
        if key not in self._cache:
            ab = self.split_pairs(split).to(device)
            self._cache[key] = self._build(ab[:, 0], ab[:, 1])
        return self._cache[key]

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """``batch_size`` training pairs drawn uniformly (with replacement)."""
        train = self._split_batch("train", generator.device)
        rows = torch.randint(0, self.n_train, (batch_size,), generator=generator, device=generator.device)
        return train[rows]

    def train_batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        """Every training pair when ``full_batch``, else ``batch_size`` of them without replacement."""
        train = self._split_batch("train", generator.device)
        if self.cfg.full_batch:
            return train
        rows = torch.randperm(self.n_train, generator=generator, device=generator.device)[:batch_size]
        return train[rows]

    def eval_set(self, size: int, seed: int, device: torch.device | str = "cpu") -> Batch:
        """The held-out pairs (the first ``size`` in the split's fixed order); ``seed`` is not needed."""
        return self._split_batch("test", device)[:size]

    def train_set(self, device: torch.device | str = "cpu") -> Batch:
        return self._split_batch("train", device)

    def corrupt(self, batch: Batch, generator: torch.Generator) -> Batch:
        """``a`` resampled to a different number (``b`` kept), so every answer changes."""
        a = resample_different(batch.tokens[:, 0], 0, self.cfg.p, generator)
        return self._build(a, batch.tokens[:, 1])
