"""Balanced brackets: ``[BOS, c_1..c_n, =]`` -> ``T`` if the brackets balance, else ``F``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from toylens.data.base import Batch, Task, TaskConfig, register_task
from toylens.data.tasks._common import check_split_sides, draw_from_split, require


@dataclass
class BracketsConfig(TaskConfig):
    name: str = "brackets"
    length: int = 16  # n: brackets per sequence (even)
    frac_train: float | None = 0.8  # share of all 2^n strings trained on; the rest is held out. null: no split
    split_seed: int = 0  # which strings are held out; independent of the run's seed


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

    Fixed split (``frac_train``, default 0.8): each of the ``2^n`` strings is held out iff a fixed hash
    of the string and ``split_seed`` (``_common.split_u``) is ``>= frac_train``. ``sample`` draws only
    training strings, ``eval_set`` only held-out ones (each row redrawn within its category until it
    is on its side), so the held-out set is disjoint from training by construction: at n = 16 there
    are only 12,870 balanced strings, which random sampling would mostly repeat.
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
        f = cfg.frac_train
        require(f is None or 0 < f < 1, "frac_train", f, "must be in (0, 1), or null for no split")
        if f is not None and cfg.length <= 16:  # small enough to list: every kind must exist on both sides
            codes = torch.arange(2**cfg.length)
            s = (codes[:, None] >> torch.arange(cfg.length) & 1) * 2 - 1
            kind = _is_balanced(s).long() + 2 * (s.sum(dim=1) == 0).long()
            check_split_sides("brackets", self._tokens_of(s), kind, f, cfg.split_seed)
        super().__init__(cfg)

    def _tokens_of(self, s: Tensor) -> Tensor:
        """Bracket tokens for +1/-1 steps (what the split hashes)."""
        return self.CLOSE - (s > 0).long()

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

    def _sample(self, batch_size: int, generator: torch.Generator, held_out: bool | None) -> Batch:
        dev = generator.device
        rank = torch.randperm(batch_size, generator=generator, device=dev)  # row categories, exact shares
        balanced = 2 * rank < batch_size
        equal = 8 * rank < 7 * batch_size

        def draw(rows: Tensor) -> Tensor:
            s = torch.where(
                equal[rows, None],
                self._equal_counts(balanced[rows], generator),
                self._unequal_counts(len(rows), generator),
            )
            return self._tokens_of(s)

        if held_out is None:
            brackets = draw(torch.arange(batch_size, device=dev))
        else:
            brackets = draw_from_split(draw, batch_size, dev, held_out, self.cfg.frac_train, self.cfg.split_seed)
        tokens = torch.full((batch_size, self.seq_len), self.EQ, device=dev)
        tokens[:, 0] = self.BOS
        tokens[:, 1:-1] = brackets
        targets = torch.zeros_like(tokens)
        targets[:, -1] = self.FALSE - balanced.long()
        loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
        loss_mask[:, -1] = True
        return Batch(tokens, targets, loss_mask)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """Training strings (all strings when ``frac_train`` is null)."""
        return self._sample(batch_size, generator, None if self.cfg.frac_train is None else False)

    def eval_set(self, size: int, seed: int, device: torch.device | str = "cpu") -> Batch:
        """``size`` held-out strings, fixed by ``seed`` (any strings when ``frac_train`` is null)."""
        gen = torch.Generator(device=device).manual_seed(seed)
        return self._sample(size, gen, None if self.cfg.frac_train is None else True)
