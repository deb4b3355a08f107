"""``toylens-analyze run=<run dir>``: a thin ``@hydra.main`` around ``make_report``.

Writes ``<run>/report/{index.html,report.json,ablation.csv,plotly.min.js}`` and prints the path of
``index.html``. Bad input (no ``run=``, a path that is not a run, an unknown analysis, a
non-positive size...) exits with status 2 and one line on stderr naming the field and the fix,
before anything is written; an unreadable checkpoint exits with status 1. Hydra itself writes
nothing: ``hydra.run.dir`` is ``.`` and ``hydra.output_subdir`` null (configs/analyze.yaml).
In a multirun (``-m run=a,b``) errors are raised instead, so Hydra marks that job failed.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from toylens._paths import config_dir
from toylens.report.config import register_configs
from toylens.runs.config import ConfigError


def _fail_or_raise(e: Exception, code: int, multirun: bool) -> None:
    """A single run exits with one line and ``code``; in a multirun Hydra marks the job failed."""
    if multirun:
        raise e
    _fail(str(e), code)


def _fail(msg: str, code: int) -> None:
    print(f"toylens-analyze: error: {msg}", file=sys.stderr)
    sys.exit(code)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="analyze")
def _hydra_main(dcfg: DictConfig) -> str | None:
    from toylens.report.build import AnalysisFailed, make_report
    from toylens.report.config import validate
    from toylens.runs.checkpoint import CheckpointError
    from toylens.runs.run import RunError, load_run

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        try:
            cfg = OmegaConf.to_object(dcfg)
        except MissingMandatoryValue:
            raise ConfigError("run is required: toylens-analyze run=<the run directory toylens-train printed>"
                              ) from None
        validate(cfg)
        if cfg.model.source == "pretrained":
            return _pretrained(cfg, multirun)
        run = load_run(cfg.run)
        run.check_step(cfg.step)
    except (ConfigError, RunError) as e:
        _fail_or_raise(e, 2, multirun)
    from toylens.model.fold import FoldCheckError  # TransformerLens: seconds, so only past the input checks

    try:
        index = make_report(run, cfg)
    except (ConfigError, RunError) as e:  # e.g. device=cuda without CUDA, model_config.json unusable
        _fail_or_raise(e, 2, multirun)
    except (CheckpointError, FoldCheckError, AnalysisFailed) as e:  # unreadable checkpoint; strict=true failure
        _fail_or_raise(e, 1, multirun)
    print(f"toylens-analyze: report of {run.name} (step {run.check_step(cfg.step)}):", file=sys.stderr)
    print(index)
    return str(index)


def _pretrained(cfg, multirun: bool) -> str:
    """model=pretrained: the intervention report of a pretrained model on cfg.pairs, written to cfg.out."""
    from toylens.analyze.pretrained import PretrainedError
    from toylens.analyze.prompts import PromptError
    from toylens.report.pretrained import make_pretrained_report

    try:
        index = make_pretrained_report(cfg)
    except (PretrainedError, PromptError, ConfigError) as e:
        _fail_or_raise(e, 2, multirun)
    print(f"toylens-analyze: report of {cfg.model.name}:", file=sys.stderr)
    print(index)
    return str(index)


def main() -> None:
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
