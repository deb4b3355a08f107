"""In-context rule following: ``a b c -> c ; d e f -> f ; g h i -> i`` (pick the k-th of each group), or with
``rule: shift`` ``y = x + k``. Layout, fillers and zero-shot prompts: docs/internals.md, "The icl task"."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from toylens.data.base import Batch, Task, TaskConfig, register_task
from toylens.data.tasks._common import next_token_targets, require, symbol_names

RULES = ("pick", "shift")


@dataclass
class ICLConfig(TaskConfig):
    name: str = "icl"
    n_symbols: int = 26  # token ids 3..n_symbols+2 (0 BOS, 1 "->", 2 ";")
    group_size: int = 3  # g: distinct symbols per group
    n_demos: int = 4  # solved groups before the query
    ks: list[int] = field(default_factory=lambda: [0, 1, 2])  # the rules: answer = group[k] (shift: x + k)
    rule: str = "pick"  # pick: y = group[k]; shift: y = (x + k) mod n_symbols, needs group_size 1
    fillers: int = 0  # filler tokens "_" scattered between groups at random (fixed count per sequence)


@register_task
class ICL(Task):
    """``[BOS, (x_1..x_g, ->, y, ;) * n_demos, x_1..x_g, ->, y_query]`` with ``y = x_{k+1}``.

    With ``rule: shift`` (``g = 1``), ``y = (x + k) mod n_symbols`` (``answer``).

    The symbols of a group are distinct (so the rule is identifiable from any demo), groups are
    independent. The last token is the query's answer (teacher forcing). Targets are the next
    token; ``loss_mask`` is true at every ``->`` (each demo's answer and the query's answer).
    """

    name = "icl"
    config_cls = ICLConfig
    BOS, ARROW, SEMI, FIRST_SYMBOL = 0, 1, 2, 3

    def __init__(self, cfg: ICLConfig):
        require(cfg.group_size >= 1, "group_size", cfg.group_size, "must be at least 1; raise it")
        require(cfg.rule in RULES, "rule", cfg.rule, f"is not a rule; use one of {list(RULES)}")
        shift = cfg.rule == "shift"
        require(not shift or cfg.group_size == 1, "group_size", cfg.group_size, "must be 1 for rule=shift; set it to 1")
        require(
            cfg.n_symbols >= max(2, cfg.group_size),
            "n_symbols",
            cfg.n_symbols,
            f"must be at least 2 and at least group_size={cfg.group_size} (a group's symbols are distinct)",
        )
        require(cfg.n_demos >= 0, "n_demos", cfg.n_demos, "must be at least 0 (0 is zero-shot)")
        require(cfg.fillers >= 0, "fillers", cfg.fillers, "must be at least 0 (0: no filler tokens)")
        ks = [int(k) for k in cfg.ks]
        require(len(ks) >= 1, "ks", ks, "must name at least one rule, e.g. [0, 1, 2]")
        n_rules = cfg.n_symbols if shift else cfg.group_size
        require(
            all(0 <= k < n_rules for k in ks),
            "ks",
            ks,
            f"must be shifts in [0, n_symbols={n_rules})" if shift
            else f"must index into a group: each k in [0, group_size={n_rules})",
        )
        require(len(set(ks)) == len(ks), "ks", ks, "must not repeat a rule; list each k once")
        super().__init__(cfg)
        self.ks = ks
        self._ks_on: dict[torch.device, Tensor] = {}

    @property
    def d_vocab(self) -> int:
        return self.cfg.n_symbols + self.FIRST_SYMBOL + (1 if self.cfg.fillers else 0)

    @property
    def filler(self) -> int:
        """The filler token's id (after the symbols; only in the vocabulary when ``fillers > 0``)."""
        return self.cfg.n_symbols + self.FIRST_SYMBOL

    @property
    def seq_len(self) -> int:
        return self.seq_len_for(self.cfg.n_demos)

    @property
    def token_names(self) -> list[str]:
        return ["BOS", "->", ";"] + symbol_names(self.cfg.n_symbols) + (["_"] if self.cfg.fillers else [])

    # --- positions ----------------------------------------------------------------------------
    def seq_len_for(self, n_demos: int | None = None) -> int:
        """Tokens per sequence with ``n_demos`` demos (the config's when None)."""
        n = self.cfg.n_demos if n_demos is None else n_demos
        return (n + 1) * (self.cfg.group_size + 3) + self.cfg.fillers

    def arrow_position(self, n_demos: int | None = None) -> int:
        """Index of the final ``->`` (where the query's answer is predicted): ``seq_len - 2``."""
        return self.seq_len_for(n_demos) - 2

    # --- sampling -----------------------------------------------------------------------------
    def _ks(self, device: torch.device) -> Tensor:
        if device not in self._ks_on:
            self._ks_on[device] = torch.tensor(self.ks, device=device)
        return self._ks_on[device]

    def _groups(self, batch_size: int, n_demos: int, generator: torch.Generator) -> Tensor:
        """``[batch, n_demos + 1, g]`` symbol ids, distinct within each group (uniform ordered draws).

        The i-th symbol is the r-th smallest not yet chosen, r uniform in ``[0, n_symbols - i)``: the
        fixed point of ``v = r + #{chosen <= v}``, reached from ``v = r`` in at most i steps. This
        is a handful of tiny ops, unlike an argsort over all symbols per group.
        """
        shape, dev = (batch_size, n_demos + 1), generator.device
        chosen = torch.empty((*shape, 0), dtype=torch.long, device=dev)
        for i in range(self.cfg.group_size):
            r = torch.randint(0, self.cfg.n_symbols - i, shape, generator=generator, device=dev)
            v = r
            for _ in range(i):
                v = r + (chosen <= v[..., None]).sum(dim=-1)
            chosen = torch.cat([chosen, v[..., None]], dim=-1)
        return chosen + self.FIRST_SYMBOL

    @property
    def n_rules(self) -> int:
        """How many rules there could be: ``group_size`` indices (pick) or ``n_symbols`` shifts."""
        return self.cfg.n_symbols if self.cfg.rule == "shift" else self.cfg.group_size

    def answer(self, groups: Tensor, k: int | Tensor) -> Tensor:
        """The answer of each group under rule ``k``: ``groups`` ``[*batch, g]`` -> ``[*batch]``.

        ``k`` is one rule or one per row (``[batch]``, broadcast over any further group dims).
        """
        k = torch.as_tensor(k, device=groups.device)
        k = k.view(*k.shape, *[1] * (groups.ndim - 1 - k.ndim))  # [batch] against [batch, G]
        if self.cfg.rule == "shift":
            n, first = self.cfg.n_symbols, self.FIRST_SYMBOL
            return (groups[..., 0] - first + k) % n + first
        return groups.gather(-1, k.expand(groups.shape[:-1])[..., None])[..., 0]

    def _build(self, groups: Tensor, k: Tensor, generator: torch.Generator) -> Batch:
        """Lay out ``groups`` (``[batch, G, g]``) answered by rule ``k`` (``[batch]``), fillers drawn last."""
        batch, n_groups = groups.shape[:2]
        answers = self.answer(groups, k)[..., None]
        arrow = torch.full_like(answers, self.ARROW)
        semi = torch.full_like(answers, self.SEMI)
        body = torch.cat([groups, arrow, answers, semi], dim=2).view(batch, -1)[:, :-1]
        bos = torch.full((batch, 1), self.BOS, dtype=body.dtype, device=body.device)
        if self.cfg.fillers:
            body = self._scatter_fillers(body, n_groups, generator)
        tokens = torch.cat([bos, body], dim=1)
        return Batch(tokens, next_token_targets(tokens), tokens == self.ARROW)

    def _scatter_fillers(self, body: Tensor, n_groups: int, generator: torch.Generator) -> Tensor:
        """Insert ``fillers`` filler tokens into ``body``, each in the gap before a uniformly drawn group."""
        batch, width, dev = body.shape[0], self.cfg.group_size + 3, body.device
        gap = torch.randint(0, n_groups, (batch, self.cfg.fillers), generator=generator, device=generator.device)
        per_gap = torch.zeros(batch, n_groups, dtype=torch.long, device=dev)
        per_gap.scatter_add_(1, gap.to(dev), torch.ones_like(gap, device=dev))
        group_of = torch.arange(body.shape[1], device=dev) // width  # body position -> its group
        dest = torch.arange(body.shape[1], device=dev) + per_gap.cumsum(1)[:, group_of]  # [batch, body pos]
        out = torch.full((batch, body.shape[1] + self.cfg.fillers), self.filler, dtype=body.dtype, device=dev)
        return out.scatter_(1, dest, body)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        ks = self._ks(generator.device)
        pick = torch.randint(0, len(ks), (batch_size,), generator=generator, device=generator.device)
        return self._build(self._groups(batch_size, self.cfg.n_demos, generator), ks[pick], generator)

    def sample_rule(
        self, batch_size: int, generator: torch.Generator, k: int, n_demos: int | None = None
    ) -> Batch:
        """A batch that follows rule ``k`` in every row, with ``n_demos`` demos (config's when None).

        ``n_demos=0`` gives zero-shot queries ``[BOS, x_1..x_g, ->, y]``. ``k`` may be any index
        into a group (a shift in ``[0, n_symbols)`` for ``rule: shift``), also one outside ``ks``.
        """
        n = self.cfg.n_demos if n_demos is None else n_demos
        if not 0 <= k < self.n_rules:
            what = "n_symbols" if self.cfg.rule == "shift" else "group_size"
            raise ValueError(f"k={k} must be in [0, {what}={self.n_rules})")
        if n < 0:
            raise ValueError(f"n_demos={n} must be at least 0")
        rule = torch.full((batch_size,), k, dtype=torch.long, device=generator.device)
        return self._build(self._groups(batch_size, n, generator), rule, generator)

    # --- analysis helpers ---------------------------------------------------------------------
    def _arrows(self, tokens: Tensor) -> Tensor:
        """``[batch, n_groups]`` positions of every ``->`` (checked to be an icl layout of this task)."""
        is_arrow = tokens == self.ARROW
        n = is_arrow.sum(1)
        n_groups = int(n[0]) if len(n) else 0
        if n_groups < 1 or bool((n != n_groups).any()) or tokens.shape[1] != self.seq_len_for(n_groups - 1):
            raise ValueError(f"batch of {tokens.shape[1]} tokens is not an icl layout of this task "
                             f"(group_size {self.cfg.group_size}, fillers {self.cfg.fillers}); sample it from the task")
        return is_arrow.nonzero()[:, 1].view(len(tokens), n_groups)

    def _groups_before(self, tokens: Tensor, arrows: Tensor) -> Tensor:
        """``[batch, n_groups, g]``: the symbols in front of each ``->``."""
        g = self.cfg.group_size
        at = arrows[..., None] - g + torch.arange(g, device=tokens.device)
        return tokens.gather(1, at.flatten(1)).view(*arrows.shape, g)

    def rule_of(self, batch: Batch) -> Tensor:
        """The rule ``k`` of each row, read off its first group (``[batch]``)."""
        arrows = self._arrows(batch.tokens)[:, :1]
        first = self._groups_before(batch.tokens, arrows)[:, 0]
        answer = batch.tokens.gather(1, arrows + 1)[:, 0]
        if self.cfg.rule == "shift":
            return (answer - first[:, 0]) % self.cfg.n_symbols
        return (first == answer[:, None]).int().argmax(dim=1)

    def query_group(self, tokens: Tensor) -> Tensor:
        """``[batch, g]``: the query's symbols, right before the final ``->``."""
        arrow = self.arrow_position(self._arrows(tokens).shape[1] - 1)
        return tokens[:, arrow - self.cfg.group_size:arrow]

    def zero_shot(self, groups: Tensor) -> Tensor:
        """``[BOS, ;, x_1..x_g, ->]`` for each query ``groups[b]`` (``[batch, g]``): the query as it
        follows the demos, the demos gone. The ``;`` is at position 1, the ``->`` at ``g + 2``."""
        n, dev = groups.shape[0], groups.device
        bos = torch.full((n, 1), self.BOS, dtype=groups.dtype, device=dev)
        return torch.cat([bos, torch.full_like(bos, self.SEMI), groups, torch.full_like(bos, self.ARROW)], dim=1)

    def separators(self, tokens: Tensor) -> Tensor:
        """``[batch, pos]`` bool: the ``;`` positions (where each demo ends)."""
        return tokens == self.SEMI

    def corrupt(self, batch: Batch, generator: torch.Generator) -> Batch:
        """The same symbols answered by a different rule ``k'`` (uniform over ``ks`` minus ``k``).

        Every group, the query included, follows ``k'``: the demos' answer tokens change, and the
        targets (the next tokens) follow the new rule, so the query's target becomes ``answer(x, k')``.
        The clean answer is the clean batch's target at ``arrow_position``. Works for any number
        of demos (and fillers stay where they were); needs a rule in ``ks`` other than the row's own.
        """
        arrows = self._arrows(batch.tokens)
        k = self.rule_of(batch)
        ks = self._ks(k.device)
        allowed = ks[None, :] != k[:, None]
        if not bool(allowed.any(dim=1).all()):
            raise ValueError(f"task.ks={self.ks} needs a second rule for corrupt(); list at least two ks")
        keys = torch.rand(allowed.shape, generator=generator, device=generator.device)
        new_k = ks[keys.masked_fill(~allowed, -1.0).argmax(dim=1)]
        tokens = batch.tokens.clone()
        tokens.scatter_(1, arrows + 1, self.answer(self._groups_before(tokens, arrows), new_k))
        return Batch(tokens, next_token_targets(tokens), tokens == self.ARROW)

    def accuracy(self, logits: Float[Tensor, "batch pos d_vocab"], batch: Batch) -> Tensor:
        """Fraction of rows whose query answer (argmax at the final ``->``) is right.

        The demos' answers are in the loss but not in this metric: only the query tests the rule.
        """
        pred = logits[:, -2].argmax(-1)
        return (pred == batch.targets[:, -2]).float().mean()
