"""``toylens-train``: a thin ``@hydra.main`` around ``train(cfg)``.

The whole config is composed, typed and validated before Hydra runs (``_precheck``), so a bad
config exits with status 2 and one line on stderr naming the field and the fix, and nothing is
created. Ctrl-C is one line and status 130. In a multirun (``-m``) each job goes through
``toylens.sweep.job.run_sweep_job``: it records its status in the sweep's index, skips finished
runs and resumes unfinished ones, and a failed job never stops its siblings.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue

from toylens import _cli
from toylens._paths import config_dir
from toylens.runs.config import ConfigError, register_configs
from toylens.train.resume import explicit_keys

# configs/hydra/launcher/{joblib,ray,submitit_local}.yaml share their names with the plugins' schemas,
# so Hydra validates them against those schemas (wanted) and warns that this matching is deprecated.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema",
                        category=UserWarning)

PROG = "toylens-train"
_created: list[Path] = []  # directories above the run directory that did not exist before this command


def _remove_if_empty(run_dir: Path) -> None:
    """Remove what this command created and left empty: the run directory (an empty one, or one holding
    only the run lock) and any parent it created. Never anything that holds a file."""
    from toylens.runs.lock import LOCK_FILE

    try:
        entries = list(run_dir.iterdir())
    except OSError:
        return
    if [p.name for p in entries] == [LOCK_FILE]:
        entries[0].unlink()
    for d in (run_dir, *_created):
        try:
            d.rmdir()  # only succeeds on an empty directory: never deletes anything written
        except OSError:
            break


def _task_options(argv: list[str]) -> list[str]:
    """Register ``task=<plugin or reference>`` (each value of a sweep too) as Hydra options before Hydra composes
    (``runs.config.register_task_option``); returns argv with absolute file paths made relative to the working
    directory (Hydra's option names cannot start with /)."""
    import os

    from toylens.refs import is_file_ref

    out = []
    for a in argv:
        key, eq, value = a.partition("=")
        if eq and key.lstrip("+") == "task" and not a.startswith("-"):
            values = value.split(",")  # task=a.py:A,b.py:B in a sweep (a path holding a comma is not supported)
            fixed = []
            for v in values:
                v = v.strip()
                if is_file_ref(v) and os.path.isabs(os.path.expanduser(v)):
                    path, attr = v.rsplit(":", 1)
                    v = f"{os.path.relpath(os.path.expanduser(path))}:{attr}"
                if v and not (config_dir() / "task" / f"{v}.yaml").is_file():
                    from toylens.runs.config import register_task_option

                    register_task_option(v)
                fixed.append(v)
            a = f"{key}={','.join(fixed)}"
        out.append(a)
    return out


def _precheck(argv: list[str]) -> list[str]:
    """Compose, type-check and validate the command line as Hydra will; returns argv to hand to Hydra
    (``resume=`` gets ``hydra.run.dir=<that run>`` so Hydra creates no new directory)."""
    overrides = _cli.overrides_of(argv)
    if overrides is None:
        return argv
    _check_moved_data(overrides)
    from toylens.runs.config import TrainConfig, resolve_device, validate

    dcfg = _cli.compose(config_dir(), "train", overrides)
    hydra_run_dir = OmegaConf.select(dcfg, "hydra.run.dir")
    with open_dict(dcfg):
        del dcfg["hydra"]
    try:
        cfg = OmegaConf.to_object(dcfg)
    except MissingMandatoryValue as e:  # task=sequences without task.path: name the key and the fix
        raise ConfigError(_cli.missing_message(e)) from None
    except Exception as e:
        raise ConfigError(" ".join(str(e).split("\n")[0].split())) from None
    _cli.check_no_unknown_keys(dcfg, cfg, overrides)
    if not isinstance(cfg, TrainConfig):
        raise ConfigError("the composed config is not a training config")
    if _cli.is_multirun(argv):  # each job's own directory and resume are the sweep's business
        validate(cfg)
        return argv
    if cfg.resume:
        from toylens.train.resume import reconcile

        cfg = reconcile(cfg, explicit_keys(overrides))
        if not any(o.startswith("hydra.run.dir=") for o in overrides):
            argv = [*argv, f"hydra.run.dir={cfg.resume}"]
    validate(cfg)
    resolve_device(cfg.device)
    run_dir = Path(cfg.resume or hydra_run_dir).expanduser().absolute()
    _check_writable(run_dir, "hydra.run.dir" if any(o.startswith("hydra.run.dir=") for o in overrides)
                    else "checkpoint_root")
    _created.extend(p for p in run_dir.parents if not p.exists())
    return argv


def _check_moved_data(overrides: list[str]) -> None:
    """``resume=<run> task.path=<file>``: a resumed run keeps its task; its data file's new place is ``data_path=``
    (without this, the default task's composition would only say task.path is not a setting)."""
    keys = {o.split("=", 1)[0].lstrip("+~"): o.split("=", 1)[-1] for o in overrides}
    if "resume" in keys and "task.path" in keys and "task" not in keys:
        raise ConfigError(f"task.path={keys['task.path']}: a resumed run keeps its task settings; to point the run "
                          f"at its moved data file pass data_path={keys['task.path']} instead")


def _check_writable(run_dir: Path, field: str) -> None:
    import tempfile

    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{field}: {run_dir} is a file, not a directory; choose another {field}")
    base = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not base.is_dir():
        raise ConfigError(f"{field}: {base} is a file, so {run_dir} cannot be created; choose another {field}")
    try:
        Path(tempfile.mkdtemp(dir=base, prefix=".toylens-check-")).rmdir()
    except OSError as e:
        raise ConfigError(f"{field}: cannot create directories in {base} ({e.strerror}); choose a writable "
                          f"{field}") from None


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def _hydra_main(dcfg: DictConfig) -> str | None:
    from toylens.runs.checkpoint import CheckpointError
    from toylens.train.loop import TrainingDiverged, TrainingInterrupted, train

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    if hc.mode == RunMode.MULTIRUN:
        from toylens.sweep.job import run_sweep_job

        return run_sweep_job(dcfg, hc)
    try:
        cfg = OmegaConf.to_object(dcfg)
        overrides = list(hc.overrides.task)
        result = train(cfg, run_dir=None if cfg.resume else run_dir, explicit=explicit_keys(overrides),
                       overrides=overrides)
    except (ConfigError, CheckpointError, TrainingDiverged) as e:
        _remove_if_empty(run_dir)
        _cli.fail(PROG, str(e), 2 if isinstance(e, ConfigError) else 1)
    except TrainingInterrupted as e:
        _cli.fail(PROG, str(e), 130)
    except KeyboardInterrupt:
        _remove_if_empty(run_dir)
        _cli.fail(PROG, "interrupted before training started; nothing was saved", 130)
    print(f"toylens: {result.summary()}; run directory:", file=sys.stderr)
    print(result.run_dir)
    return str(result.run_dir)


HELP = """toylens-train: train a small TransformerLens model on a synthetic task, save checkpoints and metrics
to a run directory, and print that directory.

Usage:
  toylens-train [group=option ...] [key=value ...]     one run in checkpoints/<name>/<time>/
  toylens-train experiment=no_pos_prev_token            a ready-made setting (configs/experiment/)
  toylens-train resume=<run dir> [train.steps=N]        continue a run bit-for-bit (same lr schedule)
  toylens-train -m seed=0,1,2 [hydra/launcher=joblib]   a sweep: one run per value (launchers below)
  toylens-analyze run=<run dir>                         then analyse the run (toylens-analyze --help)

Groups:
{groups}

Settings (key=default):
{settings}

Hydra's own options: --hydra-help, --cfg job, hydra.run.dir=<dir>.
"""


def help_text(argv: list[str] = ()) -> str:
    """--help; with ``task=<name or reference>`` (or ``experiment=``) on the line, that task's own settings too."""
    from toylens.data import TASKS
    from toylens.data.registry import plugin_names
    from toylens.runs.config import TrainConfig

    groups = _cli.groups_lines(config_dir(), ["experiment", "model", "task", "optim", "logger", "debug",
                                              "hydra/launcher"])
    plugins = plugin_names()
    # continuation lines under the task= group (no key of their own: one line per key)
    more = [f"  {'':<16} installed plugins: {', '.join(plugins)}"] if plugins else []
    more.append(f"  {'':<16} or your own: task=path/to/file.py:Class, task=package.module:Class")
    at = next(i for i, line in enumerate(groups) if line.lstrip().startswith("task=")) + 1
    groups[at:at] = more
    register_configs()
    chosen = [a for a in argv if a.split("=", 1)[0].lstrip("+").split(".")[0] in ("task", "experiment")]
    dcfg = _cli.compose(config_dir(), "train", _task_options(chosen))
    with open_dict(dcfg):
        del dcfg["hydra"]
    _cli.show_missing(dcfg)  # task=sequences: task.path has no default; --help shows it as <required>
    cfg = OmegaConf.to_object(dcfg)  # the defaults as configs/train.yaml composes them
    assert isinstance(cfg, TrainConfig)
    settings = [s for s in _cli.settings_lines(cfg) if not s.lstrip().startswith("task.")]
    where = f"configs/task/{cfg.task.name}.yaml" if cfg.task.name in TASKS else type(cfg.task).__name__
    if chosen:
        settings += [s for s in _cli.settings_lines(cfg) if s.lstrip().startswith("task.")]
    else:
        settings.append(f"  task.*                       the task's own settings (task={cfg.task.name}: {where}; "
                        f"--help task=<name> lists them)")
    return HELP.format(groups="\n".join(groups), settings="\n".join(settings))


def main() -> None:
    argv = sys.argv[1:]
    if any(a in _cli._HELP_FLAGS for a in argv):
        try:
            print(help_text([a for a in argv if a not in _cli._HELP_FLAGS]))
        except (ConfigError, _cli.UsageError) as e:
            _cli.fail(PROG, str(e), 2)
        return
    register_configs()
    _cli.one_line_warnings(PROG)
    try:
        sys.argv = [sys.argv[0], *_precheck(_task_options(argv))]
        _hydra_main()
    except (ConfigError, _cli.UsageError) as e:
        _cli.fail(PROG, str(e), 2)
    except KeyboardInterrupt:
        _cli.fail(PROG, "interrupted; nothing was started", 130)


if __name__ == "__main__":
    main()
