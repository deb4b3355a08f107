"""Reconciling a resume request with the configuration the run was started with, and choosing the
checkpoint to continue from.

``resume=<run dir>`` continues that run bit-for-bit, so its saved config is authoritative. Only
the keys in ``CHANGEABLE`` (how long to train, how often to evaluate and save, where to log, which
device) may differ; any other explicitly requested value that differs is an error naming the key.
The learning-rate schedule keeps the length it was started with (``optim.schedule_steps`` changes it).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from toylens.runs import checkpoint as ck
from toylens.runs.checkpoint import CheckpointError, list_checkpoints
from toylens.runs.config import ConfigError, TrainConfig, read_saved_config

CHANGEABLE = (
    "train.steps", "train.stop_at_eval_loss", "train.stop_at_accuracy", "train.eval_every",
    "train.checkpoint_every", "train.keep_last", "train.log_every", "train.progress", "device", "threads",
    "resume", "checkpoint_root", "logger.", "optim.schedule_steps", "task_source", "data_path",
)


_GLOBAL_GROUPS = {"experiment", "debug"}  # these may set any key


def explicit_keys(overrides: list[str]) -> list[str]:
    """The config keys a list of Hydra overrides sets (used to reconcile ``resume=``)."""
    keys = []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key.startswith("hydra"):
            continue
        keys.append("" if key in _GLOBAL_GROUPS else key)
    return keys


def _leaves(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_leaves(v, key + "."))
        else:
            out[key] = v
    return out


def _changeable(key: str) -> bool:
    return any(key == c or (c.endswith(".") and key.startswith(c)) for c in CHANGEABLE)


def load_run_config(run_dir: Path, task_source: str | None = None) -> TrainConfig:
    """The run's saved config, read without resolving interpolations (toylens saved it resolved)."""
    path = Path(run_dir) / ".hydra" / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"resume={run_dir}: no {path.relative_to(run_dir)} there; pass a toylens run directory")
    from toylens.runs.task_source import TaskSourceError, restore_task

    try:
        restore_task(Path(run_dir), task_source)
    except TaskSourceError as e:
        raise ConfigError(f"resume={run_dir}: {e}") from None
    try:
        return TrainConfig.from_dict(read_saved_config(path))
    except (ValueError, TypeError) as e:  # ConfigError is a ValueError
        why = " ".join(str(e).split())[:200]
        raise ConfigError(f"resume={run_dir}: {path.relative_to(run_dir)} is unusable ({why}); "
                          f"restore the file toylens-train wrote") from None


def schedule_length(cfg: TrainConfig, state: dict | None) -> int:
    """Steps of the learning-rate schedule: ``optim.schedule_steps`` when given, else what the run
    being resumed used (its checkpoint says), else ``train.steps``. Past its end the rate stays final."""
    if cfg.optim.schedule_steps:
        return cfg.optim.schedule_steps
    if state is not None and state.get("schedule_steps"):
        return int(state["schedule_steps"])
    if cfg.resume:
        return load_run_config(Path(cfg.resume), cfg.task_source).train.steps
    return cfg.train.steps


def resume_checkpoint(run_dir: Path, device: str) -> tuple[int, dict | None, dict | None]:
    """``(step, weights, state)`` of the newest intact checkpoint, or ``(0, None, None)`` when the run has
    none yet (it starts again from step 0 with its saved config). Called under the run lock: removes
    what a killed writer left behind and sets aside (``*.corrupt``) checkpoints that fail to load."""
    removed = ck.remove_leftovers(run_dir)
    if removed:
        print(f"toylens: removed {len(removed)} leftover file(s) of an interrupted write: {', '.join(removed[:3])}"
              + (" ..." if len(removed) > 3 else ""), file=sys.stderr)
    steps = list_checkpoints(run_dir)
    for step in reversed(steps):
        try:
            weights, state = ck.load_weights(run_dir, step, device), ck.load_state(run_dir, step)
            bad = next((k for k, v in weights.items() if v.is_floating_point() and not bool(v.isfinite().all())
                        and not k.endswith("IGNORE")), None)
            if bad is not None:
                raise CheckpointError(f"{ck.weights_path(run_dir, step)}: {bad} holds NaN or inf")
        except CheckpointError as e:
            path = ck.weights_path(run_dir, step)
            if path.exists() and not path.is_symlink():
                path.rename(path.with_name(path.name + ".corrupt"))
            print(f"toylens: skipped checkpoint step {step} ({' '.join(str(e).split())[:160]}); set aside as "
                  f"{path.name}.corrupt", file=sys.stderr)
            continue
        if step != steps[-1]:
            print(f"toylens: resuming from step {step}, the newest intact checkpoint", file=sys.stderr)
        return step, weights, state
    if steps:
        raise CheckpointError(f"resume={run_dir}: none of its checkpoints {steps} is intact; start a new run")
    print(f"toylens: {run_dir} has no checkpoint yet; training it from step 0 with its saved config", file=sys.stderr)
    return 0, None, None


def point_at_data(saved: TrainConfig, data_path: str | None, run_dir: Path) -> TrainConfig:
    """The run's config reading its data file from ``data_path`` when given; ConfigError (one line) when the
    recorded file is gone and no data_path says where it went (``toylens.runs.run.check_data_file``)."""
    from toylens.runs.run import RunError, check_data_file, with_data_path

    try:
        if data_path is not None:
            saved.task = with_data_path(saved.task, data_path, run_dir)
        check_data_file(run_dir, saved)
    except RunError as e:
        raise ConfigError(f"resume={run_dir}: {e}") from None
    return saved


def as_recorded(task_cfg, saved_cfg):
    """The requested task config as a run records it (``Task.pinned_config``: absolute path, the data's vocabulary),
    so a sweep job's ``task.path=seqs.npy`` equals the run's recorded absolute path. The hash stays the run's: a
    changed file warns when the task is made, as on any resume. A config that cannot be made is left to validate()."""
    from toylens.data import make_task

    if type(task_cfg) is not type(saved_cfg):
        return task_cfg
    try:
        pinned = make_task(task_cfg).pinned_config()
    except (ValueError, TypeError):
        return task_cfg
    return dataclasses.replace(pinned, sha256=saved_cfg.sha256) if hasattr(pinned, "sha256") else pinned


def reconcile(requested: TrainConfig, explicit: list[str] | None = None) -> TrainConfig:
    """The config to resume with: the run's saved config plus the allowed explicit changes.

    ``explicit`` lists the keys the user set (CLI overrides: ``train.steps`` for ``train.steps=9``,
    ``model`` for a group choice, ``""`` for an experiment, which may set anything). ``None`` means
    every key of ``requested`` is explicit (the Python API, where the whole config is given).
    """
    run_dir = Path(requested.resume).expanduser().resolve()
    if not run_dir.is_dir():
        raise ConfigError(f"resume={requested.resume}: no such directory; pass an existing run directory")
    saved = point_at_data(load_run_config(run_dir, requested.task_source), requested.data_path, run_dir)
    prefixes = [""] if explicit is None else explicit
    if any(p in ("", "task") or p.startswith("task.") for p in prefixes):
        requested = dataclasses.replace(requested, task=as_recorded(requested.task, saved.task))
    req, old = _leaves(requested.to_dict()), _leaves(saved.to_dict())
    merged = dict(old)
    for key, value in req.items():
        if not any(key == p or key.startswith(p + ".") or p == "" for p in prefixes):
            continue
        if _changeable(key):
            merged[key] = value
        elif value != old.get(key) and key == "task.path":  # the run's data moved: data_path= says where
            raise ConfigError(f"resume: task.path={value} differs from the run being resumed ({old.get(key)}); to "
                              f"point the run at its moved data file pass data_path={value} instead")
        elif value != old.get(key):
            raise ConfigError(
                f"resume: {key}={value!r} differs from the run being resumed ({old.get(key)!r}); "
                f"drop that override (only train.steps/eval/checkpoint cadence, logger and device may change)"
            )
    nested: dict = {}
    for key, value in merged.items():
        node = nested
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    cfg = TrainConfig.from_dict(nested)
    cfg.resume = str(run_dir)
    return cfg
