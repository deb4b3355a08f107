"""Balanced brackets: ``[BOS, c_1..c_n, =]`` -> ``T`` if the brackets balance, else ``F``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from toylens.data.base import Batch, Task, TaskConfig, register_task
from toylens.data.tasks._common import require


@dataclass
class BracketsConfig(TaskConfig):
    name: str = "brackets"
    length: int = 16  # n: brackets per sequence (even)


def _is_balanced(steps: Tensor) -> Tensor:
    """Rows of +1 ("(") / -1 (")") steps whose prefix sums never go negative and end at zero."""
    depth = steps.cumsum(dim=1)
    return ~(depth < 0).any(dim=1) & (depth[:, -1] == 0)


@register_task
class Brackets(Task):
    """Tokens ``[BOS, c_1..c_n, =]`` with ``c`` in ``(``/``)``; the target at ``=`` is ``T`` or ``F``.

    Exactly ``ceil(batch/2)`` rows are balanced (uniform over balanced strings), in random rows.
    Of the unbalanced rows about 3/4 have as many ``(`` as ``)`` but a wrong order, so counting
    alone cannot solve the task; the rest have unequal counts. ``loss_mask`` is true at ``=`` only.
    """

    name = "brackets"
    config_cls = BracketsConfig
    BOS, OPEN, CLOSE, EQ, TRUE, FALSE = range(6)

    def __init__(self, cfg: BracketsConfig):
        require(
            cfg.length >= 2 and cfg.length % 2 == 0,
            "length",
            cfg.length,
            "must be even and at least 2 (a balanced string has as many '(' as ')'); use an even length",
        )
        super().__init__(cfg)

    @property
    def d_vocab(self) -> int:
        return 6

    @property
    def seq_len(self) -> int:
        return self.cfg.length + 2

    @property
    def token_names(self) -> list[str]:
        return ["BOS", "(", ")", "=", "T", "F"]

    def _equal_counts(self, balanced: Tensor, generator: torch.Generator) -> Tensor:
        """Strings with as many ``(`` as ``)``: balanced rows where ``balanced``, unbalanced elsewhere.

        Both come from one uniform arrangement of ``m`` up-steps and ``m+1`` down-steps, rotated so
        that it ends with a down-step, which is then dropped. Cycle lemma: exactly one rotation
        keeps the prefix sums >= 0 until that final step, the one starting right after the first
        minimum of the prefix sums; it gives a uniformly random balanced string. Rotating after a
        uniformly chosen down-step instead gives a uniform string with equal counts; those that
        happen to balance (1 in m+1) are reversed (a reversed balanced string starts with ``)``),
        so the unbalanced ones are not quite uniform: reversed balanced strings come twice as often.
        """
        m, dev = self.cfg.length // 2, generator.device
        n1 = 2 * m + 1
        keys = torch.rand((balanced.shape[0], n1), generator=generator, device=dev)
        perm = keys.argsort(dim=1)  # a uniform permutation: position i is "(" iff perm[i] < m
        s = (perm < m).long() * 2 - 1
        first_min = s.cumsum(dim=1).argmin(dim=1)  # argmin returns the first minimum
        random_down = (perm == m).long().argmax(dim=1)  # uniform among the down-steps
        start = (torch.where(balanced, first_min, random_down) + 1) % n1
        s = s.gather(1, (start[:, None] + torch.arange(n1 - 1, device=dev)) % n1)  # drops the last
        return torch.where(~balanced[:, None] & _is_balanced(s)[:, None], s.flip(1), s)

    def _unequal_counts(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """Uniform random strings; one random bracket flipped where the counts happen to be equal."""
        n, dev = self.cfg.length, generator.device
        s = torch.randint(0, 2, (batch_size, n), generator=generator, device=dev) * 2 - 1
        pos = torch.randint(0, n, (batch_size, 1), generator=generator, device=dev)
        flip = (torch.arange(n, device=dev) == pos) & (s.sum(dim=1, keepdim=True) == 0)
        return torch.where(flip, -s, s)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        dev = generator.device
        rank = torch.randperm(batch_size, generator=generator, device=dev)  # row categories, exact shares
        balanced = 2 * rank < batch_size
        equal = 8 * rank < 7 * batch_size
        s = torch.where(
            equal[:, None],
            self._equal_counts(balanced, generator),
            self._unequal_counts(batch_size, generator),
        )
        tokens = torch.full((batch_size, self.seq_len), self.EQ, device=dev)
        tokens[:, 0] = self.BOS
        tokens[:, 1:-1] = self.CLOSE - (s > 0).long()
        targets = torch.zeros_like(tokens)
        targets[:, -1] = self.FALSE - balanced.long()
        loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
        loss_mask[:, -1] = True
        return Batch(tokens, targets, loss_mask)
