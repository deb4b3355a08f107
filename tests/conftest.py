"""Shared test set-up: one torch thread per test process (pytest-xdist runs one process per core),
wandb offline and silent, and a factory for tiny training configs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def tiny_config(tmp_path: Path, **overrides):
    """A TrainConfig that trains in well under a second: 2 layers, d_model 32, prev_token on 20 tokens."""
    from toylens.data import TASKS
    from toylens.runs.config import LoopConfig, ModelConfig, OptimConfig, TrainConfig

    cfg = TrainConfig(
        name="tiny",
        checkpoint_root=str(tmp_path / "checkpoints"),
        seed=0,
        device="cpu",
        model=ModelConfig(n_layers=2, d_model=32, n_heads=2, d_head=16, d_mlp=64,
                          positional_embedding_type="none"),
        task=TASKS["prev_token"].config_cls(d_vocab=20, seq_len=12),
        optim=OptimConfig(lr=3e-3, warmup_steps=5),
        train=LoopConfig(batch_size=16, steps=20, eval_every=10, eval_size=64, checkpoint_every=10,
                         log_every=5, keep_last=10, progress=False),
    )
    for key, value in overrides.items():
        obj = cfg
        *parents, last = key.split(".")
        for p in parents:
            obj = getattr(obj, p)
        setattr(obj, last, value)
    return cfg


@pytest.fixture
def tiny(tmp_path):
    return lambda **kw: tiny_config(tmp_path, **kw)


def train_tiny(run_dir: Path, **overrides) -> Path:
    """Train ``tiny_config`` (20 steps, checkpoints at 10 and 20) into ``run_dir``; returns it."""
    from toylens.train.loop import train

    return train(tiny_config(Path(run_dir).parent, **overrides), run_dir=run_dir).run_dir


@pytest.fixture(scope="session")
def tiny_run():
    """``train_tiny`` for fixtures of any scope: ``tiny_run(dir, **{"model.n_heads": 1})``."""
    return train_tiny
