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


# --- fixed train/held-out splits ----------------------------------------------------------------
_M1, _M2, _GOLDEN = -0x40A7B892E31B1A47, -0x6B2FB644ECCEEE15, -0x61C8864680B583EB  # splitmix64, as int64


def _shr(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic on negative values)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def split_u(codes: Tensor, split_seed: int) -> Tensor:
    """A fixed pseudo-random number in ``[0, 1)`` per int64 ``code``: splitmix64 of ``code`` and the seed.

    Pure integer arithmetic (int64 products wrap the same way on every device), so an input's side
    of a split never depends on a generator, a device or the run's seed.
    """
    offset = ((split_seed + 1) * _GOLDEN + (1 << 63)) % (1 << 64) - (1 << 63)  # wrapped to int64 in Python
    z = codes.long() + offset
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    z = z ^ _shr(z, 31)
    return _shr(z, 11).double() / float(1 << 53)


def draw_from_split(draw, n: int, device, held_out: bool, frac_train: float, split_seed: int,
                    max_rounds: int = 10_000) -> Tensor:
    """``n`` inputs ``draw(rows)`` (a ``[len(rows), m]`` tensor for those row indices), each row redrawn
    until it lies on the asked side of the fixed split: an input is held out iff
    ``split_u(input_codes(x), split_seed) >= frac_train``. Rows keep their index, so a task can fix
    each row's category (balanced or not) before drawing."""
    rows = torch.arange(n, device=device)
    x = draw(rows)
    for _ in range(max_rounds):
        wrong = (split_u(input_codes(x), split_seed) >= frac_train) != held_out
        if not bool(wrong.any()):
            return x
        idx = wrong.nonzero().squeeze(1)
        x[idx] = draw(rows[idx])
    raise RuntimeError(f"no input of some kind falls in the {'held-out' if held_out else 'training'} split "
                       f"after {max_rounds} draws; change task.frac_train or task.split_seed")


def input_codes(x: Tensor) -> Tensor:
    """One int64 code per row of token ids (Horner's rule with an odd multiplier, wrapping): equal rows
    give equal codes; the rare collision only puts two inputs on the same side of a split."""
    h = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for i in range(x.shape[1]):
        h = h * 1_000_003 + x[:, i].long()
    return h


def check_split_sides(task: str, all_inputs: Tensor, kinds: Tensor, frac_train: float, split_seed: int) -> None:
    """For a small input space (``all_inputs``: every input, ``kinds``: each one's category), require
    every category to have inputs on both sides of the split, else sampling one side could not end."""
    held_out = split_u(input_codes(all_inputs), split_seed) >= frac_train
    for k in kinds.unique().tolist():
        sides = held_out[kinds == k]
        require(bool(sides.any()) and not bool(sides.all()), "frac_train", frac_train,
                f"leaves one side of {task}'s split without inputs of some kind (only {len(sides)} exist); "
                f"use a larger input space, another task.split_seed, or task.frac_train=null (no split)")
