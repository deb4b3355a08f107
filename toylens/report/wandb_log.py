"""Log a written report to the run's own wandb run (the one its training logged to).

The wandb run is resumed by id (``resume="allow"``, ``dir=<run dir>``) through
``toylens.runs.loggers.WandbLogger``, so the mode is decided exactly as in training: ``online``
without a login (or with ``WANDB_MODE=offline``) logs offline into ``<run dir>/wandb``. Logged:
every scalar of report.json as the run summary (``analyze/...`` keys), the ablation ranking as a
``wandb.Table`` and the page as ``wandb.Html`` (with plotly.js inlined, so it renders inside wandb).
"""

from __future__ import annotations

from pathlib import Path

from toylens.report.page import Report
from toylens.runs.run import Run

SUMMARY_PREFIX = "analyze/"


def summary_numbers(data: dict, prefix: str = SUMMARY_PREFIX) -> dict:
    """Scalars (numbers, strings, booleans) of report.json with flattened ``a/b/c`` keys; lists are
    left out (matrices, series), except lists of records such as the ablation rows, keyed by index."""
    out: dict = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(summary_numbers(v, key + "/"))
        elif isinstance(v, (bool, int, float, str)) or v is None:
            out[key] = v
    return out


def log_report(run: Run, report: Report, report_dir: Path, wandb_id: str | None) -> str:
    """Log ``report`` to the run's wandb run; returns the wandb run id used."""
    from plotly.offline import get_plotlyjs

    from toylens.report.html import render
    from toylens.runs.loggers import WandbLogger

    logger = WandbLogger(run.config.logger, run.path, run.config.to_dict(), resume_id=wandb_id)
    try:
        wandb = logger.wandb
        summary = summary_numbers({k: v for k, v in report.data.items() if k not in ("figures", "sections")})
        if report.ablation is not None:
            for i, r in enumerate(report.ablation.rows[:10]):
                summary[f"{SUMMARY_PREFIX}ablation/top/{i + 1}/hook"] = r.hook
                summary[f"{SUMMARY_PREFIX}ablation/top/{i + 1}/delta_loss"] = r.delta_loss
        logger.run.summary.update(summary)
        media: dict = {f"{SUMMARY_PREFIX}report": wandb.Html(render(report, plotly_js=get_plotlyjs()), inject=False)}
        if report.ablation is not None:
            media[f"{SUMMARY_PREFIX}ablation"] = wandb.Table(
                columns=["rank", "hook", "mode", "loss", "delta_loss", "accuracy"],
                data=[[i + 1, r.hook, r.mode, r.loss, r.delta_loss, r.accuracy]
                      for i, r in enumerate(report.ablation.rows)])
        logger.run.log(media)
        return logger.id
    finally:
        logger.close()
