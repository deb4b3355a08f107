"""Metric sinks. ``metrics.jsonl`` is always written; wandb is optional and never prompts or hangs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


class JsonlLogger:
    """One JSON object per logged step, appended and flushed (a crash loses at most one line)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._f = open(self.path, "a")

    def log(self, row: dict[str, Any]) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text() or "wandb" in netrc.read_text()
    except OSError:
        return False


class WandbLogger:
    """wandb run in ``<run_dir>/wandb``. ``mode=online`` without credentials (or when going online
    fails) falls back to offline mode and says so once on stderr; training never waits on it."""

    def __init__(self, cfg, run_dir: Path, config: dict, resume_id: str | None = None):
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb  # imported here: ~1 s, only for runs that use it

        self.wandb = wandb
        mode = cfg.mode
        if mode == "online" and (os.environ.get("WANDB_MODE") == "offline" or not _has_wandb_credentials()):
            print("toylens: wandb has no login here; logging offline to "
                  f"{Path(run_dir) / 'wandb'} (sync later with `wandb sync`)", file=sys.stderr)
            mode = "offline"
        kwargs = dict(
            project=cfg.project, entity=cfg.entity, group=cfg.group, tags=list(cfg.tags) or None,
            config=config, dir=str(run_dir), name=Path(run_dir).name,
            id=resume_id, resume="allow" if resume_id else None,
        )
        try:
            self.run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=30, silent=True), **kwargs)
        except Exception as e:  # network down, server refused, ...
            if mode != "online":
                raise
            print(f"toylens: wandb could not go online ({str(e).splitlines()[0]}); logging offline",
                  file=sys.stderr)
            self.run = wandb.init(mode="offline", settings=wandb.Settings(silent=True), **kwargs)
        self.id = self.run.id

    def log(self, row: dict[str, Any]) -> None:
        step = row.get("step")
        self.run.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def log_checkpoint(self, paths: list[Path], step: int) -> None:
        art = self.wandb.Artifact(name=f"model-{self.run.id}", type="model", metadata={"step": step})
        for p in paths:
            art.add_file(str(p))
        self.run.log_artifact(art, aliases=["latest", f"step_{step}"])

    def close(self) -> None:
        self.run.finish()


class Loggers:
    """Fan-out to the jsonl file and (optionally) wandb."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def log(self, row: dict[str, Any]) -> None:
        for s in self.sinks:
            s.log(row)

    def log_checkpoint(self, paths: list[Path], step: int) -> None:
        for s in self.sinks:
            if hasattr(s, "log_checkpoint"):
                s.log_checkpoint(paths, step)

    @property
    def wandb_id(self) -> str | None:
        return next((s.id for s in self.sinks if isinstance(s, WandbLogger)), None)

    def close(self) -> None:
        for s in self.sinks:
            s.close()
