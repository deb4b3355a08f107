"""Log a trained SAE to the run's own wandb run (resumed by id, offline without a login, as the report does):
its numbers as summary keys ``sae/<hook>/...``, the training curves as a table, the page, and the SAE as an artifact."""

from __future__ import annotations

from pathlib import Path

from toylens.analyze.sae.pipeline import SAEResult
from toylens.report.page import Report
from toylens.report.wandb_log import summary_numbers
from toylens.runs.run import Run


def log_sae(run: Run, r: SAEResult, report: Report, sae_dir: Path, wandb_id: str) -> str:
    """Log ``r`` to the run's wandb run; returns the wandb run id used."""
    from plotly.offline import get_plotlyjs

    from toylens.report.html import render
    from toylens.runs.loggers import WandbLogger

    prefix = f"sae/{r.hook}/"
    logger = WandbLogger(run.config.logger, run.path, run.config.to_dict(), resume_id=wandb_id)
    try:
        wandb = logger.wandb
        summary = summary_numbers({"eval": r.eval.to_dict(), "settings": r.settings.to_dict(),
                                   "seconds_per_million": r.seconds_per_million}, prefix)
        logger.run.summary.update(summary)
        c = r.curves
        logger.run.log({
            f"{prefix}curves": wandb.Table(columns=["step", "mse", "explained_variance", "l0", "dead_latents"],
                                           data=[list(row) for row in zip(c.step, c.mse, c.explained_variance,
                                                                          c.l0, c.dead, strict=True)]),
            f"{prefix}report": wandb.Html(render(report, plotly_js=get_plotlyjs()), inject=False)})
        art = wandb.Artifact(name=f"sae-{logger.id}-{r.hook}".replace("/", "_"), type="sae",
                             metadata={"hook": r.hook, "step": r.step, **r.eval.to_dict()})
        for f in ("cfg.json", "sae_weights.safetensors", "runner_cfg.json", "toylens_sae.json"):
            if (sae_dir / f).is_file():
                art.add_file(str(sae_dir / f))
        logger.run.log_artifact(art)
        return logger.id
    finally:
        logger.close()
