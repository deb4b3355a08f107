"""One job of a sweep (``toylens-train -m ...``) on any launcher: it skips finished runs, resumes unfinished ones
and records failures without stopping its siblings. Details: docs/internals.md, "Sweep jobs"."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from toylens.sweep import index as ix


def wandb_group(sweep_dir: Path, name: str) -> str:
    """The wandb group every run of a sweep shares: ``<experiment name>/<sweep dir name>``."""
    return f"{name}/{Path(sweep_dir).name}"


def run_sweep_job(dcfg: DictConfig, hc) -> str | None:
    """Run (or skip, or resume) one sweep job; returns the run directory, or None when it failed."""
    from toylens.runs import checkpoint as ck
    from toylens.train.resume import explicit_keys

    run_dir = Path(hc.runtime.output_dir).resolve()
    sweep_dir = Path(hc.sweep.dir).resolve()
    num = int(hc.job.num)
    overrides = [str(o) for o in hc.overrides.task]
    label = f"job {num} [{' '.join(overrides)}]"
    # recorded and compared canonical (task files absolute, values unescaped): resumable from any directory
    canon = ix.canonical_overrides(overrides, hc.runtime.cwd)
    prev = ix.read_record(run_dir)
    if prev is not None and ix.canonical_overrides(prev.get("overrides") or [], hc.runtime.cwd) != canon:
        raise ix.SweepError(f"{run_dir} belongs to a run with other overrides "
                            f"({' '.join(prev.get('overrides') or [])}); use a new hydra.sweep.dir")
    status = ix.effective_status(prev) if prev else None
    if status == "finished":
        print(f"toylens-train: {label} already finished (step {prev.get('step')}): skipped", file=sys.stderr)
        print(run_dir)
        return str(run_dir)
    if status == "running":  # alive, or on another host: someone else is training it right now
        raise ix.SweepError(f"{run_dir} is being trained by pid {prev.get('pid')} on {prev.get('host')}; "
                            f"wait for it to end, or kill it and re-run")

    steps = ck.list_checkpoints(run_dir)
    resume = prev is not None and bool(steps)
    rec = {"num": num, "overrides": canon, "status": "running", "started": ix.now(),
           "launches": int((prev or {}).get("launches", 0)) + 1, **ix.process_info()}
    if resume:
        rec["resumed_from"] = steps[-1]
    elif (run_dir / "metrics.jsonl").exists():  # died before its first checkpoint: start over
        (run_dir / "metrics.jsonl").unlink()
    ix.write_record(run_dir, rec)
    t0 = time.perf_counter()
    try:
        from toylens.train.loop import train

        cfg = OmegaConf.to_object(dcfg)
        if cfg.logger.name == "wandb" and cfg.logger.group is None:
            cfg.logger.group = wandb_group(sweep_dir, cfg.name)
        rec["wandb_group"] = cfg.logger.group if cfg.logger.name == "wandb" else None
        if resume:
            cfg.resume = str(run_dir)
        result = train(cfg, run_dir=None if resume else run_dir, explicit=explicit_keys(overrides),
                       overrides=overrides)
    except Exception as e:
        rec["wall_s"] = round(time.perf_counter() - t0, 3)
        return _failed(run_dir, sweep_dir, num, canon, rec, label, e)
    except BaseException:  # KeyboardInterrupt, SystemExit: record it, then let it stop the sweep
        ix.write_record(run_dir, {**rec, "status": "interrupted", "ended": ix.now()})
        raise
    rec.update(status="finished", ended=ix.now(), step=result.step, eval_loss=result.eval_loss,
               eval_accuracy=result.eval_accuracy, stopped_early=result.stopped_early,
               wall_s=round(time.perf_counter() - t0, 3))
    ix.write_record(run_dir, rec)
    ix.update_index(sweep_dir)
    print(run_dir)
    return str(run_dir)


def _failed(run_dir: Path, sweep_dir: Path, num: int, overrides: list[str], rec: dict, label: str,
            error: BaseException) -> None:
    line = ix.one_line(error)
    print(f"toylens-train: {label} failed: {line}", file=sys.stderr)
    ix.write_record(run_dir, {**rec, "num": num, "overrides": overrides, "status": "failed",
                              "error": line, "error_type": type(error).__name__, "ended": ix.now()})
    ix.update_index(sweep_dir)
    return None
