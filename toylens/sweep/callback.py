"""The Hydra callback that keeps a sweep's index (``hydra.callbacks.sweep_index`` in configs/train.yaml).
Details: docs/internals.md, "The sweep callback"."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from toylens.sweep import index as ix

_EXTRAS = {"hydra_plugins.hydra_ray_launcher": "ray", "hydra_plugins.hydra_submitit_launcher": "slurm",
           "hydra_plugins.hydra_joblib_launcher": "joblib"}
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
RAY_LAUNCHER = "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"


def _fail(msg: str, code: int = 2) -> None:
    print(f"toylens-train: error: {msg}", file=sys.stderr)
    sys.exit(code)


def planned_jobs(config: DictConfig) -> list[list[str]] | None:
    """The jobs' overrides in job-number order, as Hydra's basic sweeper expands them (None for
    other sweepers, which choose their jobs as they go)."""
    if OmegaConf.select(config, "hydra.sweeper._target_") != BASIC_SWEEPER:
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    args = [f"{k}={v}" for k, v in params.items()] + [str(o) for o in config.hydra.overrides.task]
    try:
        overrides = OverridesParser.create().parse_overrides(args)
        return [list(job) for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
    except Exception:  # e.g. a glob over a config group needs the config loader: no plan, no harm
        return None


def check_launcher(config: DictConfig) -> None:
    """Exit 2 with the install command when the chosen launcher's plugin is missing."""
    target = str(OmegaConf.select(config, "hydra.launcher._target_") or "")
    module = target.rsplit(".", 1)[0]
    try:
        importlib.import_module(module)
    except ImportError as e:
        choice = OmegaConf.select(config, "hydra.runtime.choices", default={}).get("hydra/launcher", target)
        extra = next((x for p, x in _EXTRAS.items() if module.startswith(p)), None)
        how = f"pip install 'toylens[{extra}]'" if extra and extra != "joblib" else "pip install toylens"
        _fail(f"hydra/launcher={choice} needs {module.split('.')[1] if '.' in module else module} "
              f"({ix.one_line(e, 120)}); install it with {how}")


def local_ray_on_loopback(config: DictConfig) -> None:
    """A local Ray instance (``hydra.launcher.ray.init.address`` null) binds its GCS, raylet, workers'
    gRPC servers and agents to 127.0.0.1 only: Ray does so when it picks the loopback address as the
    node's address, which ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes it do (the dashboard itself
    is off or on 127.0.0.1 in configs/hydra/launcher/ray.yaml). Set before ``ray.init``; inherited
    by every process Ray starts. A cluster address is left alone."""
    if OmegaConf.select(config, "hydra.launcher._target_") != RAY_LAUNCHER:
        return
    if OmegaConf.select(config, "hydra.launcher.ray.init.address") is None and not os.environ.get("RAY_ADDRESS"):
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


class SweepIndexCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_launcher(config)
        local_ray_on_loopback(config)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        # canonical on both sides (task files absolute): the same sweep may be finished from another directory
        overrides = ix.canonical_overrides([str(o) for o in config.hydra.overrides.task], os.getcwd())
        previous = ix.sweep_overrides(sweep_dir)
        if previous is not None and previous != overrides:
            _fail(f"hydra.sweep.dir={sweep_dir} holds a sweep of other overrides ({' '.join(previous)}); "
                  f"re-run it with exactly those overrides to finish it, or choose a new hydra.sweep.dir")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        planned = planned_jobs(config)
        ix.update_index(sweep_dir, planned=None if planned is None else
                        [ix.canonical_overrides(job, os.getcwd()) for job in planned])

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        index = ix.update_index(sweep_dir)
        line = ix.summary_line(index)
        print(f"toylens-train: sweep {sweep_dir}: {line}; index: {sweep_dir / ix.INDEX}", file=sys.stderr)
        print(sweep_dir.resolve())
        sys.stdout.flush()
        unfinished = index["n_runs"] - index["counts"]["finished"]
        if unfinished:
            print(f"toylens-train: {unfinished} of {index['n_runs']} runs did not finish; re-run the same "
                  f"command with hydra.sweep.dir={sweep_dir.resolve()} to retry them (finished runs are "
                  f"skipped)", file=sys.stderr)
            sys.exit(1)
