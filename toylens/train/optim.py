"""AdamW with decay on matrices only (configurable) and a warmup-then-schedule learning rate."""

from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float, decay_matrices_only: bool) -> list[dict]:
    """Trainable parameters split into decayed / not decayed. Frozen ones (W_pos under positional
    "none") are left out entirely, so neither the update nor weight decay can ever touch them."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if (p.ndim >= 2 or not decay_matrices_only) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def lr_multiplier(step: int, warmup_steps: int, schedule: str, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup ``step / warmup_steps`` (the seed notebook's ``min(i / 100, 1)``), then
    constant, cosine or linear decay to ``min_lr_ratio`` at ``total_steps``."""
    if warmup_steps and step < warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_lr_ratio + (1 - min_lr_ratio) * shape


def make_optimizer(model: torch.nn.Module, optim_cfg, total_steps: int):
    o = optim_cfg
    opt = torch.optim.AdamW(
        param_groups(model, o.weight_decay, o.decay_matrices_only),
        lr=o.lr, betas=tuple(o.betas), eps=o.eps,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_multiplier(step, o.warmup_steps, o.schedule, total_steps, o.min_lr_ratio)
    )
    return opt, sched
