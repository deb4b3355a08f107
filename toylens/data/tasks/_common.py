"""Small helpers shared by the built-in tasks (not a task; registers nothing)."""

from __future__ import annotations

import string

import torch
from torch import Tensor


def require(ok: bool, field: str, value: object, fix: str) -> None:
    """Raise the one-line config error every task uses: ``task.<field>=<value> <fix>``."""
    if not ok:
        raise ValueError(f"task.{field}={value!r} {fix}")


def symbol_names(n: int) -> list[str]:
    """``n`` readable, unique, whitespace-free names: ``a``..``z``, then ``a1``..``z1``, ``a2``, ..."""
    letters = string.ascii_lowercase
    return [letters[i % 26] + (str(i // 26) if i >= 26 else "") for i in range(n)]


def next_token_targets(tokens: Tensor) -> Tensor:
    """``targets[:, i] = tokens[:, i + 1]``; the last position (nothing follows) gets token 0."""
    targets = torch.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    return targets


def resample_different(x: Tensor, low: int, high: int, generator: torch.Generator) -> Tensor:
    """A fresh uniform value in ``[low, high)`` for every entry of ``x``, each different from ``x``.

    Shifting by a uniform offset in ``[1, high - low)`` modulo the range is uniform over the other
    ``high - low - 1`` values, so it needs one ``randint`` and no rejection loop.
    """
    span = high - low
    offset = torch.randint(1, span, x.shape, generator=generator, device=x.device)
    return (x - low + offset) % span + low
