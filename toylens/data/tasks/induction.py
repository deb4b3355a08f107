"""Induction: a random segment ``x_1..x_L`` seen twice; in the repeat, predict the token that followed last time."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toylens.data.base import Batch, Task, TaskConfig, register_task
from toylens.data.tasks._common import next_token_targets, require, resample_different, symbol_names


@dataclass
class InductionConfig(TaskConfig):
    name: str = "induction"
    n_symbols: int = 50  # token ids 1..n_symbols (0 is BOS)
    half_len: int = 16  # L: the random segment that is then repeated
    layout: str = "random"  # random: the copies start at random offsets; fixed: [BOS, x, x]
    pad: int = 16  # layout=random: filler tokens placed before, between and after the two copies
    distinct: bool = True  # the segment's symbols are distinct and fillers avoid them: every answer is unique


@register_task
class Induction(Task):
    """``layout=random`` (default): ``[BOS, f.., x_1..x_L, f.., x_1..x_L, f..]``, ``pad`` uniform fillers
    ``f`` in total, split at random: ``g`` uniform in ``0..pad`` between the copies, then ``b`` uniform in
    ``0..pad-g`` before them and the rest after. The second copy is therefore ``L + g`` tokens after
    the first and starts at a random position, so no fixed positional lookup predicts it: only
    matching content (an induction circuit) does. ``layout=fixed``: ``[BOS, x_1..x_L, x_1..x_L]``
    (the second copy always ``L`` tokens later, which a 2-layer model solves positionally).

    ``distinct`` (default): the segment is ``L`` distinct symbols and the fillers are drawn (with
    replacement) from the other symbols, so every masked token occurs exactly once before its copy
    and the answer is determined (accuracy 1.0 is reachable). Otherwise every token is uniform with
    replacement, and a symbol seen twice before makes its answer ambiguous. Targets are the next
    token; ``loss_mask`` is true at the inputs ``x_1..x_{L-1}`` of the second copy, exactly where
    induction predicts the next token.
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
        require(cfg.layout in ("random", "fixed"), "layout", cfg.layout, "is unknown; choose random or fixed")
        require(cfg.pad >= 0, "pad", cfg.pad, "must be >= 0 (the number of filler tokens)")
        need = cfg.half_len + (cfg.layout == "random" and cfg.pad > 0)
        require(not cfg.distinct or cfg.n_symbols >= need, "n_symbols", cfg.n_symbols,
                f"is too few for distinct=true (a segment of half_len={cfg.half_len} distinct symbols, "
                f"fillers from the rest); use n_symbols>={need} or task.distinct=false")
        super().__init__(cfg)

    @property
    def pad(self) -> int:
        return self.cfg.pad if self.cfg.layout == "random" else 0

    @property
    def d_vocab(self) -> int:
        return self.cfg.n_symbols + 1

    @property
    def seq_len(self) -> int:
        return 1 + 2 * self.cfg.half_len + self.pad

    @property
    def token_names(self) -> list[str]:
        return ["BOS"] + symbol_names(self.cfg.n_symbols)

    def _layout(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: the gap ``g`` between the copies and the fillers ``b`` before the first."""
        dev, pad = generator.device, self.pad
        g = torch.randint(0, pad + 1, (batch_size,), generator=generator, device=dev)
        b = (torch.rand(batch_size, generator=generator, device=dev) * (pad - g + 1)).long().clamp(max=pad - g)
        return g, b

    def _symbols(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The segment ``[batch, L]`` and the fillers ``[batch, pad]`` (see ``distinct``)."""
        dev, n, L = generator.device, self.cfg.n_symbols, self.cfg.half_len
        if not self.cfg.distinct:
            x = torch.randint(1, n + 1, (batch_size, L + self.pad), generator=generator, device=dev)
            return x[:, :L], x[:, L:]
        perm = torch.rand((batch_size, n), generator=generator, device=dev).argsort(dim=1) + 1
        pick = torch.randint(L, n, (batch_size, self.pad), generator=generator, device=dev) if self.pad else None
        return perm[:, :L], (perm.gather(1, pick) if self.pad else perm[:, :0])

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        dev, L = generator.device, self.cfg.half_len
        x, fill = self._symbols(batch_size, generator)
        tokens = torch.full((batch_size, self.seq_len), self.BOS, device=dev)
        if self.pad == 0:
            tokens[:, 1 : L + 1] = tokens[:, L + 1 :] = x
            second = torch.full((batch_size,), L + 1, device=dev)
        else:
            g, b = self._layout(batch_size, generator)
            first, second = 1 + b, 1 + b + L + g
            pos = torch.arange(self.seq_len, device=dev)
            in_first = (pos >= first[:, None]) & (pos < first[:, None] + L)
            in_second = (pos >= second[:, None]) & (pos < second[:, None] + L)
            filler = (pos > 0) & ~in_first & ~in_second
            tokens[in_first] = x.flatten()
            tokens[in_second] = x.flatten()
            tokens[filler] = fill.flatten()  # row-major order: each row's fillers in position order
        return self._build(tokens, second)

    def _build(self, tokens: torch.Tensor, second: torch.Tensor) -> Batch:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        loss_mask = (pos >= second[:, None]) & (pos < second[:, None] + self.cfg.half_len - 1)
        return Batch(tokens, next_token_targets(tokens), loss_mask)

    def corrupt(self, batch: Batch, generator: torch.Generator) -> Batch:
        """Every token before the second copy resampled to a different symbol (BOS kept); the second
        copy and what follows it unchanged.

        So the first copy, the induction cue, is gone, while ``loss_mask`` and the targets at the
        masked positions (the second copy's own tokens) are unchanged: the token after the same
        position of the corrupted first copy differs from the target at every masked position.
        """
        second = batch.loss_mask.long().argmax(dim=1)
        before = (torch.arange(batch.tokens.shape[1], device=second.device) < second[:, None])
        before[:, 0] = False
        fresh = resample_different(batch.tokens, 1, self.cfg.n_symbols + 1, generator)
        return self._build(torch.where(before, fresh, batch.tokens), second)
