"""``toylens-train``: a thin ``@hydra.main`` around ``train(cfg)``.

Bad configs exit with status 2 and one line on stderr naming the field and the fix; nothing is
left behind (Hydra creates the run directory before calling us, so we remove it again while it is
still empty). In a multirun (``-m``) each job goes through ``toylens.sweep.job.run_sweep_job``:
it records its status in the sweep's index, skips finished runs and resumes unfinished ones, and a
failed job never stops its siblings (the command exits 1 at the end when any run failed).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from toylens._paths import config_dir
from toylens.runs.config import ConfigError, register_configs
from toylens.train.resume import explicit_keys

# configs/hydra/launcher/{joblib,ray,submitit_local}.yaml share their names with the plugins' schemas,
# so Hydra validates them against those schemas (wanted) and warns that this matching is deprecated.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema",
                        category=UserWarning)

def _remove_if_empty(run_dir: Path) -> None:
    for d in (run_dir, run_dir.parent):
        try:
            d.rmdir()  # only succeeds on an empty directory: never deletes anything written
        except OSError:
            break


def _fail(msg: str, code: int) -> None:
    print(f"toylens-train: error: {msg}", file=sys.stderr)
    sys.exit(code)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def _hydra_main(dcfg: DictConfig) -> str | None:
    from toylens.runs.checkpoint import CheckpointError
    from toylens.train.loop import TrainingDiverged, train

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
        _fail(str(e), 2 if isinstance(e, ConfigError) else 1)
    if cfg.resume:
        _remove_if_empty(run_dir)
    ev = f"eval/loss {result.eval_loss:.4g}, eval/accuracy {result.eval_accuracy:.4g}, " if result.eval_loss else ""
    print(f"toylens: step {result.step}, {ev}run directory:", file=sys.stderr)
    print(result.run_dir)
    return str(result.run_dir)


def main() -> None:
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
