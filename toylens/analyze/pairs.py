"""Clean/corrupted prompt pairs (``PromptPairs``): token ids, one answer position per prompt and the answers as
``[batch, 2, k]`` token ids, the one input shape of patching, tracing, metrics and discovery."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

PAD = -1


class PairsError(ValueError):
    """Prompt pairs that cannot be used as given; the message names the field and the fix."""


@dataclass(frozen=True, eq=False)
class PromptPairs:
    clean: Int[Tensor, "batch pos"]
    corrupted: Int[Tensor, "batch pos"]
    answer_pos: Int[Tensor, " batch"]
    answers: Int[Tensor, "batch 2 k"]
    str_tokens: list[str] | None = None  # labels of the clean prompt's positions (first prompt), for plots

    def __post_init__(self) -> None:
        c, x, p, a = self.clean, self.corrupted, self.answer_pos, self.answers
        for name, t in (("clean", c), ("corrupted", x), ("answer_pos", p), ("answers", a)):
            if not isinstance(t, Tensor) or t.dtype != torch.long:
                raise PairsError(f"PromptPairs.{name}: expected an int64 tensor, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)}; convert with .long()")
        if c.ndim != 2 or c.shape != x.shape:
            raise PairsError(f"PromptPairs.corrupted: shape {tuple(x.shape)} must equal clean's {tuple(c.shape)} "
                             "[batch, pos]; pad or choose prompts of the same token length")
        b, n = c.shape
        if p.shape != (b,):
            raise PairsError(f"PromptPairs.answer_pos: shape {tuple(p.shape)}, expected ({b},): "
                             "one position per prompt")
        if a.ndim != 3 or a.shape[:2] != (b, 2) or a.shape[2] < 1:
            raise PairsError(f"PromptPairs.answers: shape {tuple(a.shape)}, expected ({b}, 2, k): "
                             "[correct, incorrect] token ids per prompt, padded with -1")
        devices = {t.device for t in (c, x, p, a)}
        if len(devices) != 1:
            raise PairsError(f"PromptPairs: tensors on several devices {sorted(map(str, devices))}; move them to one")
        if ((p < 0) | (p >= n)).any():
            raise PairsError(f"PromptPairs.answer_pos: values must lie in [0, {n}); "
                             f"got {p.min().item()}..{p.max().item()}")
        if (a[:, :, 0] == PAD).any():
            raise PairsError("PromptPairs.answers: every prompt needs a first correct and incorrect token "
                             "(slot 0 is -1)")
        if self.str_tokens is not None and len(self.str_tokens) != n:
            raise PairsError(f"PromptPairs.str_tokens: {len(self.str_tokens)} labels for {n} positions")

    @property
    def batch_size(self) -> int:
        return self.clean.shape[0]

    @property
    def n_pos(self) -> int:
        return self.clean.shape[1]

    def answer_mask(self) -> Tensor:
        """``[batch, k]`` bool: token slots scored in both the correct and the incorrect answer."""
        return (self.answers[:, 0] != PAD) & (self.answers[:, 1] != PAD)

    def to(self, device: torch.device | str) -> PromptPairs:
        return PromptPairs(self.clean.to(device), self.corrupted.to(device), self.answer_pos.to(device),
                           self.answers.to(device), self.str_tokens)

    def labels(self) -> list[str]:
        """Position labels for plots: ``"{i}:{token}"`` when str_tokens are known, else ``"{i}"``."""
        if self.str_tokens is None:
            return [str(i) for i in range(self.n_pos)]
        return [f"{i}:{t}" for i, t in enumerate(self.str_tokens)]
