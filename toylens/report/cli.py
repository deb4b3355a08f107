"""``toylens-analyze run=<run dir>``: a thin ``@hydra.main`` around ``make_report``.

Writes ``<run>/report/{index.html,report.json,ablation.csv,plotly.min.js}`` and prints the path of
``index.html``. Bad input (no ``run=``, a path that is not a run, an unknown analysis, a
non-positive size...) exits with status 2 and one line on stderr naming the field and the fix,
before anything is written; an unreadable checkpoint exits with status 1. Hydra itself writes
nothing: ``hydra.run.dir`` is ``.`` and ``hydra.output_subdir`` null (configs/analyze.yaml).
In a multirun (``-m run=a,b``) errors are raised instead, so Hydra marks that job failed.
A report replaces only a report toylens wrote; the checkpoint analysed is read into memory first, so
a training process still pruning that run cannot take it away.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue

from toylens import _cli
from toylens._paths import config_dir
from toylens.report.config import AnalyzeConfig, register_configs
from toylens.runs.config import ConfigError


def _fail_or_raise(e: Exception, code: int, multirun: bool) -> None:
    """A single run exits with one line and ``code``; in a multirun Hydra marks the job failed."""
    if multirun:
        raise e
    _fail(str(e), code)


def _fail(msg: str, code: int) -> None:
    _cli.fail("toylens-analyze", msg, code)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="analyze")
def _hydra_main(dcfg: DictConfig) -> str | None:
    from toylens.analyze.pairs import PairsError
    from toylens.report.build import AnalysisFailed, make_report
    from toylens.report.config import validate
    from toylens.report.folder import check_report_dir
    from toylens.runs.checkpoint import CheckpointError
    from toylens.runs.run import RunError, load_run
    from toylens.runs.tokenizer import PromptError

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        try:
            cfg = OmegaConf.to_object(dcfg)
        except MissingMandatoryValue:
            raise ConfigError("run is required: toylens-analyze run=<the run directory toylens-train printed>"
                              ) from None
        validate(cfg)
        if cfg.model.source == "pretrained":
            if cfg.data_path is not None:
                raise ConfigError(f"data_path={cfg.data_path} is only for model=run (a run's moved data file); drop it")
            check_report_dir(cfg.out, "out")  # before the work: never replace what toylens did not write
            return _pretrained(cfg, multirun)
        if cfg.out is not None:
            raise ConfigError(f"out={cfg.out} is only for model=pretrained; a run's report always goes to "
                              f"<run>/report, so drop out=")
        run = load_run(cfg.run, cfg.task_source, cfg.data_path)
        run.task  # noqa: B018  (rebuilt now: a task that cannot be is one line, before any analysis runs)
        check_report_dir(run.path / "report")
        cfg.step = run.pin(cfg.step)  # read now: a run still training may prune it later
    except (ConfigError, RunError) as e:
        _fail_or_raise(e, 2, multirun)
    except CheckpointError as e:  # unreadable or tampered checkpoint files
        _fail_or_raise(e, 1, multirun)
    from toylens.model.fold import FoldCheckError  # TransformerLens: seconds, so only past the input checks

    try:
        _check_prompts(run, cfg)  # before the work: bad prompts are bad input, not a failed analysis
        index = make_report(run, cfg)
    except (ConfigError, RunError, PairsError, PromptError) as e:  # e.g. device=cuda without CUDA, bad prompts
        _fail_or_raise(e, 2, multirun)
    except (CheckpointError, FoldCheckError, AnalysisFailed) as e:  # unreadable checkpoint; strict=true failure
        _fail_or_raise(e, 1, multirun)
    print(f"toylens-analyze: report of {run.name} (step {run.check_step(cfg.step)}):", file=sys.stderr)
    print(index)
    return str(index)


def _check_prompts(run, cfg) -> None:
    """Tokenize ``pairs.*`` prompts with the run's tokenizer now (PairsError, one line) when an analysis uses them."""
    p = cfg.pairs
    if not p.clean or not {"patching", "tracing"} & set(cfg.analyses):
        return
    from toylens.analyze.prompts import pairs_from_prompts

    pairs_from_prompts(run.model(cfg.step), p.clean, p.corrupted, p.answers, p.wrong_answers or None)


def _pretrained(cfg, multirun: bool) -> str:
    """model=pretrained: the intervention report of a pretrained model on cfg.pairs, written to cfg.out."""
    from toylens.analyze.pairs import PairsError
    from toylens.analyze.pretrained import PretrainedError
    from toylens.analyze.prompts import PromptError
    from toylens.report.build import AnalysisFailed
    from toylens.report.pretrained import make_pretrained_report

    try:
        index = make_pretrained_report(cfg)
    except (PretrainedError, PromptError, PairsError, ConfigError) as e:
        _fail_or_raise(e, 2, multirun)
    except AnalysisFailed as e:  # strict=true: the report is written, with the error in its section
        _fail_or_raise(e, 1, multirun)
    print(f"toylens-analyze: report of {cfg.model.name}:", file=sys.stderr)
    print(index)
    return str(index)


HELP = """toylens-analyze: analyse a trained toylens run (or a pretrained model) and write an offline HTML
report (index.html, report.json, ablation.csv) beside it; prints the path of index.html.

Usage:
  toylens-analyze run=<run dir>                        every analysis of the last checkpoint -> <run>/report/
  toylens-analyze run=<run dir> step=500 analyses=[attention,ablation]
  toylens-analyze run=<run dir> over=checkpoints       + training dynamics over every saved checkpoint
  toylens-analyze run=<run dir> analyses=[attention,probe.py:probe]   + your own analysis (docs/analyses.md)
  toylens-analyze model=pretrained model.name=gpt2 pairs.clean=[...] pairs.corrupted=[...] out=<new dir>
  toylens-analyze -m run=<a>,<b>                        several runs (Hydra multirun; hydra/launcher=joblib)
  toylens-analyze run=<run dir> data_path=<file>       a run whose data file (task.path) moved
  (resume= belongs to toylens-train: toylens-train resume=<run dir> continues a run)

Groups:
  model=           run, pretrained

Analyses (analyses=[...]; page order is fixed):
{analyses}

Settings (key=default):
{settings}
"""


def help_text() -> str:
    register_configs()
    dcfg = _cli.compose(config_dir(), "analyze", [])
    with open_dict(dcfg):
        del dcfg["hydra"]
    cfg = OmegaConf.to_object(dcfg)
    assert isinstance(cfg, AnalyzeConfig)
    return HELP.format(analyses="\n".join(analyses_lines()), settings="\n".join(_cli.settings_lines(cfg)))


def analyses_lines() -> list[str]:
    """The analyses=[...] choices, as toylens-train --help lists tasks: the built-ins, the installed
    ``toylens.analyses`` plugins (by the name to select them with), and how to give your own."""
    from toylens.report.registry import ANALYSES, plugin_names

    plugins = plugin_names()
    lines = [f"  {'built-in:':<19} {', '.join(ANALYSES)}"]
    if plugins:
        lines.append(f"  {'installed plugins:':<19} {', '.join(plugins)}")
    lines.append(f"  {'your own:':<19} path/to/file.py:function or package.module:function (docs/analyses.md)")
    return lines


def _precheck(argv: list[str]) -> None:
    """Compose and type-check the command line as Hydra will, so a bad override is one line (exit 2)."""
    overrides = _cli.overrides_of(argv)
    if overrides is None:
        return
    moved = next((o for o in overrides if o.split("=", 1)[0].lstrip("+~") == "task.path"), None)
    if moved is not None:  # the run's task is as it trained; only where its data file lies now may change
        raise _cli.UsageError(f"{moved}: a run's task settings are fixed; to point the run at its moved data file "
                              f"pass data_path={moved.split('=', 1)[-1]}")
    try:
        dcfg = _cli.compose(config_dir(), "analyze", overrides)
    except _cli.UsageError as e:
        if str(e).startswith("step="):
            raise _cli.UsageError(f"{e}; use step=<a saved step> or step=null for the last") from None
        raise
    with open_dict(dcfg):
        del dcfg["hydra"]
    try:
        cfg = OmegaConf.to_object(dcfg)
    except MissingMandatoryValue:
        return  # the run's own check says what is missing
    except Exception as e:
        raise ConfigError(" ".join(str(e).split("\n")[0].split())) from None
    _cli.check_no_unknown_keys(dcfg, cfg, overrides)
    if cfg.over is None:  # settings only over=checkpoints reads would be ignored without a word
        unread = next((o for o in overrides if o.split("=", 1)[0].lstrip("+~").startswith(("dynamics.", "llc."))),
                      None)
        if unread is not None:
            raise _cli.UsageError(f"{unread}: read only over checkpoints; add over=checkpoints (or drop it)")


def main() -> None:
    argv = sys.argv[1:]
    if any(a in _cli._HELP_FLAGS for a in argv):
        print(help_text())
        return
    register_configs()
    _cli.one_line_warnings("toylens-analyze")
    try:
        _precheck(argv)
        _hydra_main()
    except (ConfigError, _cli.UsageError) as e:
        _fail(str(e), 2)
    except KeyboardInterrupt:
        _fail("interrupted; no report was written", 130)


if __name__ == "__main__":
    main()
