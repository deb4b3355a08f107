"""Shared by the sweep tests: tiny-run overrides, ``toylens-train -m`` in a subprocess, a test-only
config group ``case`` (added with ``hydra.searchpath``) and a sweep directory built in-process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = ["experiment=no_pos_prev_token", "debug=fast", "model.d_model=32", "model.d_head=16", "model.n_heads=2",
        "model.d_mlp=64", "task.d_vocab=20", "task.seq_len=12", "train.eval_size=64", "device=cpu"]
# ``+case=s0,s1,s2,bad``: three seeds and a run that diverges at run time (loss NaN by step 5).
CASES = {"s0": "seed: 0\n", "s1": "seed: 1\n", "s2": "seed: 2\n", "bad": "optim:\n  lr: 1.0e30\n"}


def env(**extra) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", HYDRA_FULL_ERROR="0",
             **extra)
    e.pop("WANDB_API_KEY", None)
    e.pop("RAY_ADDRESS", None)
    return e


def train_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "toylens.train.cli", *args]


def run_train(args, cwd, timeout=420) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(*args), cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def case_dir(root: Path) -> Path:
    """A config dir holding the group ``case`` (``@package _global_``); pass it with ``hydra.searchpath``."""
    d = root / "test_configs"
    (d / "case").mkdir(parents=True, exist_ok=True)
    for name, body in CASES.items():
        (d / "case" / f"{name}.yaml").write_text("# @package _global_\n" + body)
    return d


@pytest.fixture(scope="session")
def fake_sweep(tmp_path_factory, tiny_run) -> Path:
    """Runs 0-2 (seeds 0, 1, 2) finished, run 3 failed: the records and multirun.yaml a real sweep
    writes, the runs trained in-process (fast). Real multiruns are in test_launchers/test_resume."""
    from omegaconf import OmegaConf

    from toylens.sweep import index as ix

    sweep = tmp_path_factory.mktemp("fake") / "sweep"
    seeds = [0, 1, 2]
    overrides = [[f"seed={s}", "debug=fast"] for s in [*seeds, 3]]
    for num, seed in enumerate(seeds):
        run_dir = tiny_run(sweep / str(num), seed=seed, name="tiny")
        ix.write_record(run_dir, {"num": num, "overrides": overrides[num], "status": "finished", "step": 20,
                                  "wall_s": 0.5 + num})
    (sweep / "3").mkdir()
    ix.write_record(sweep / "3", {"num": 3, "overrides": overrides[3], "status": "failed",
                                  "error": "train/loss became nan by step 5; lower optim.lr"})
    OmegaConf.save(OmegaConf.create({"hydra": {"overrides": {"task": ["seed=0,1,2,3", "debug=fast"]},
                                                "runtime": {"choices": {"hydra/launcher": "local"}}}}),
                   sweep / "multirun.yaml")
    return sweep
