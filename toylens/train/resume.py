"""Reconciling a resume request with the configuration the run was started with.

``resume=<run dir>`` continues that run bit-for-bit, so its saved config is authoritative. Only
the keys in ``CHANGEABLE`` (how long to train, how often to evaluate and save, where to log, which
device) may differ; any other explicitly requested value that differs is an error naming the key.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from toylens.runs.checkpoint import list_checkpoints
from toylens.runs.config import ConfigError, TrainConfig

CHANGEABLE = (
    "train.steps", "train.stop_at_eval_loss", "train.eval_every", "train.checkpoint_every",
    "train.keep_last", "train.log_every", "train.progress", "device", "resume", "checkpoint_root",
    "logger.",
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


def load_run_config(run_dir: Path) -> TrainConfig:
    path = Path(run_dir) / ".hydra" / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"resume={run_dir}: no {path.relative_to(run_dir)} there; pass a toylens run directory")
    return TrainConfig.from_dict(OmegaConf.to_container(OmegaConf.load(path), resolve=True))


def reconcile(requested: TrainConfig, explicit: list[str] | None = None) -> TrainConfig:
    """The config to resume with: the run's saved config plus the allowed explicit changes.

    ``explicit`` lists the keys the user set (CLI overrides: ``train.steps`` for ``train.steps=9``,
    ``model`` for a group choice, ``""`` for an experiment, which may set anything). ``None`` means
    every key of ``requested`` is explicit (the Python API, where the whole config is given).
    """
    run_dir = Path(requested.resume).expanduser().resolve()
    if not run_dir.is_dir():
        raise ConfigError(f"resume={requested.resume}: no such directory; pass an existing run directory")
    if not list_checkpoints(run_dir):
        raise ConfigError(f"resume={run_dir}: the run has no checkpoint in ckpt/ to continue from; start a new run")
    saved = load_run_config(run_dir)
    prefixes = [""] if explicit is None else explicit
    req, old = _leaves(requested.to_dict()), _leaves(saved.to_dict())
    merged = dict(old)
    for key, value in req.items():
        if not any(key == p or key.startswith(p + ".") or p == "" for p in prefixes):
            continue
        if _changeable(key):
            merged[key] = value
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
