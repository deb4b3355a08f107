"""``toylens-sweep-report``: every run of a sweep side by side (``make_sweep_report``). Details: docs/internals.md,
"Sweep report"."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toylens.sweep import index as ix

RUN_ANALYSES = ("attention", "circuits", "ablation")
CURVES = ("train/loss", "eval/loss", "eval/accuracy")


@dataclass
class SweepReportConfig:
    analyses: list[str] = field(default_factory=lambda: list(RUN_ANALYSES))  # computed per run when missing
    batch_size: int = 2000  # rows of each run's task (toylens-analyze's batch.size)
    reference_size: int = 2000  # ablation reference rows (toylens-analyze's reference.size)
    chunk_size: int = 250
    device: str = "auto"
    top_k: int = 5  # hooks per run counted by the consistency score
    recompute: bool = False  # recompute every run's analysis even when its report.json has it
    progress: bool = True
    wandb: bool = True  # log the sweep report to wandb (offline without a login) when the sweep's runs used it


def validate(cfg: SweepReportConfig) -> None:
    from toylens.report.config import ANALYSES
    from toylens.runs.config import ConfigError

    bad = [a for a in cfg.analyses if a not in ANALYSES]
    if bad:
        raise ConfigError(f"analyses: {bad[0]!r} is not an analysis; choose from {', '.join(ANALYSES)}")
    for key in ("batch_size", "reference_size", "chunk_size", "top_k"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be positive")


# --- per run ------------------------------------------------------------------------------------
def run_analysis(run_dir: Path, cfg: SweepReportConfig) -> dict:
    """The run's report.json, computed (or completed) with toylens-analyze's ``make_report`` when needed.
    Computed here, it is not logged to the run's own wandb run (``toylens-analyze run=<dir>`` does that);
    the sweep report is logged once, for the whole group."""
    from toylens.report.build import make_report
    from toylens.report.config import ANALYSES, AnalyzeConfig
    from toylens.runs.run import load_run

    path = Path(run_dir) / "report" / "report.json"
    data = json.loads(path.read_text()) if path.is_file() else None
    missing = [a for a in cfg.analyses if data is None or a not in data]
    if cfg.recompute or missing:
        present = [a for a in ANALYSES if data is not None and a in data and not cfg.recompute]
        acfg = AnalyzeConfig(run=str(run_dir), analyses=[a for a in ANALYSES if a in set(cfg.analyses) | set(present)],
                             device=cfg.device, chunk_size=cfg.chunk_size, progress=cfg.progress, wandb=False)
        acfg.batch.size, acfg.reference.size = cfg.batch_size, cfg.reference_size
        if cfg.progress:
            print(f"toylens-sweep-report: analysing {run_dir} ({', '.join(acfg.analyses)})", file=sys.stderr)
        make_report(load_run(run_dir), acfg)
        data = json.loads(path.read_text())
    return data


def _f(v: Any) -> float:
    return math.nan if v is None else float(v)


def _last(metrics: list[dict], key: str) -> float | None:
    vals = [r[key] for r in metrics if isinstance(r.get(key), (int, float))]
    return vals[-1] if vals else None


def ablation_table(analysis: dict, mode: str = "mean") -> dict[str, float]:
    """hook -> Δloss of one run's report, in forward (hook) order; ``mode`` rows, or the report's
    first mode when it did not run ``mode``."""
    a = analysis.get("ablation") or {}
    modes = a.get("modes") or []
    use = mode if mode in modes else (modes[0] if modes else mode)
    by_hook = {r["hook"]: _f(r["delta_loss"]) for r in a.get("rows") or [] if r["mode"] == use}
    return {h: by_hook[h] for h in a.get("hooks") or by_hook if h in by_hook}


# --- across runs ----------------------------------------------------------------------------------
def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as Spearman's correlation needs)."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x), dtype=float)
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        if tie.sum() > 1:
            r[tie] = r[tie].mean()
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def top_k(delta: np.ndarray, k: int) -> list[int]:
    """Indices of the ``k`` largest Δloss (NaN counts as largest, as the ablation ranking does; ties
    go to the earlier hook in forward order)."""
    key = np.where(np.isnan(delta), np.inf, delta)
    return [int(i) for i in np.argsort(-key, kind="stable")[:k]]


def ablation_summary(tables: dict[int, dict[str, float]], top: int) -> dict:
    """Mean ± std per hook over runs, top-k fractions and the Spearman consistency (module docstring)."""
    nums = sorted(tables)
    if not nums:
        return {}
    first = tables[nums[0]]
    hooks = [h for h in first if all(h in tables[n] for n in nums)]
    d = np.array([[tables[n][h] for h in hooks] for n in nums], dtype=float)  # [run, hook]
    k = min(top, len(hooks))
    in_top = np.zeros(len(hooks))
    for row in d:
        in_top[top_k(row, k)] += 1
    ok = ~np.isnan(d).any(0)  # hooks with a number in every run
    pairs = [[nums[i], nums[j], spearman(d[i, ok], d[j, ok])] for i, j in itertools.combinations(range(len(nums)), 2)]
    rhos = [p[2] for p in pairs if not math.isnan(p[2])]
    frac = in_top / len(nums)
    return {
        "mode": "mean", "runs": nums, "hooks": hooks, "delta_loss": d.tolist(),
        "mean": d.mean(0).tolist(),
        "std": (d.std(0, ddof=1) if len(nums) > 1 else np.full(len(hooks), np.nan)).tolist(),
        "min": d.min(0).tolist(), "max": d.max(0).tolist(),
        "top_k": k, "top_k_fraction": frac.tolist(),
        "top_k_in_every_run": [h for h, f in zip(hooks, frac, strict=True) if f == 1.0],
        "spearman_pairs": pairs, "spearman_mean": float(np.mean(rhos)) if rhos else None,
        "dropped_hooks": sorted({h for n in nums for h in tables[n]} - set(hooks)),
    }


def head_score_summary(analyses: dict[int, dict]) -> dict:
    """score name -> head label -> {runs, values, mean, std} over the runs that have the score."""
    out: dict[str, dict] = {}
    for num, a in sorted(analyses.items()):
        per_head = dict((a.get("attention") or {}).get("scores_by_head") or {})
        for head, s in ((a.get("circuits") or {}).get("scores_by_head") or {}).items():
            per_head.setdefault(head, {})["copying_score"] = s.get("copying_score")
        for head, scores in per_head.items():
            for name, v in scores.items():
                entry = out.setdefault(name, {}).setdefault(head, {"runs": [], "values": []})
                entry["runs"].append(num)
                entry["values"].append(_f(v))
    for heads in out.values():
        for e in heads.values():
            v = np.array(e["values"], dtype=float)
            v = v[~np.isnan(v)]
            e["mean"] = float(v.mean()) if len(v) else None
            e["std"] = float(v.std(ddof=1)) if len(v) > 1 else None
    return out


def build_sweep_data(sweep_dir: Path, cfg: SweepReportConfig) -> dict:
    """Every number of the sweep report (report.json), computing missing run analyses."""
    from toylens.result import jsonable
    from toylens.runs.run import load_run

    validate(cfg)
    sweep_dir = Path(sweep_dir).resolve()
    index = ix.update_index(sweep_dir)
    runs, analyses, tables, curves = [], {}, {}, {}
    uses_wandb = None
    for r in index["runs"]:
        entry = {k: r.get(k) for k in ("num", "label", "dir", "status", "params", "overrides", "error", "step",
                                       "wall_s", "launches")}
        if r["status"] == "finished":
            run_dir = sweep_dir / r["dir"]
            run = load_run(run_dir)
            if run.config.logger.name == "wandb" and uses_wandb is None:
                uses_wandb = run.config.logger
            a = run_analysis(run_dir, cfg)
            analyses[r["num"]] = a
            tables[r["num"]] = ablation_table(a)
            curves[r["num"]] = {key: {"step": [m["step"] for m in run.metrics if isinstance(m.get(key), (int, float))],
                                      "value": [m[key] for m in run.metrics if isinstance(m.get(key), (int, float))]}
                                for key in CURVES}
            prev = (a.get("attention") or {}).get("previous_token_head") or {}
            abl = a.get("ablation") or {}
            top = abl.get("rows", [{}])[0] if abl.get("rows") else {}
            entry["final"] = {"train/loss": _last(run.metrics, "train/loss"),
                              "eval/loss": _last(run.metrics, "eval/loss"),
                              "eval/accuracy": _last(run.metrics, "eval/accuracy"),
                              "previous_token_head": prev.get("head"), "previous_token_score": prev.get("score"),
                              "clean_loss": abl.get("clean_loss"), "top_ablation": top.get("hook"),
                              "top_ablation_delta_loss": top.get("delta_loss")}
            entry["analysis"] = str(run_dir / "report" / "report.json")
            entry["analysis_settings"] = {k: (a.get("settings") or {}).get(k) for k in ("batch", "reference")}
        runs.append(entry)
    data = {
        "toylens_sweep_report": 1,
        "sweep": {"dir": str(sweep_dir), "index": str(sweep_dir / ix.INDEX), "launcher": index.get("launcher"),
                  "overrides": index.get("overrides"), "varied": index["varied"], "counts": index["counts"],
                  "n_runs": index["n_runs"]},
        "settings": dataclasses.asdict(cfg),
        "runs": runs,
        "curves": {str(k): v for k, v in curves.items()},
        "ablation": ablation_summary(tables, cfg.top_k),
        "head_scores": head_score_summary(analyses),
        "failed": [{"num": r["num"], "label": r["label"], "status": r["status"], "error": r.get("error")}
                   for r in runs if r["status"] in ("failed", "interrupted", "running", "pending")],
        "wandb": {"group": uses_wandb.group if uses_wandb is not None else None, "used": uses_wandb is not None},
    }
    return jsonable(data) | {"_wandb_logger": uses_wandb}


def make_sweep_report(sweep_dir: str | Path, cfg: SweepReportConfig | None = None) -> Path:
    """Build and write ``<sweep>/sweep_report/`` (atomically); log it to wandb when the runs used it.
    Returns the path of ``index.html``."""
    from toylens.report.folder import check_report_dir
    from toylens.sweep.report_page import build_sections, log_to_wandb, write_page

    cfg = cfg or SweepReportConfig()
    sweep_dir = Path(sweep_dir).resolve()
    check_report_dir(sweep_dir / "sweep_report")  # before the work: replace only a report toylens wrote
    data = build_sweep_data(sweep_dir, cfg)
    logger_cfg = data.pop("_wandb_logger")
    sections = build_sections(data)
    if cfg.wandb and logger_cfg is not None:
        try:
            data["wandb"]["id"] = log_to_wandb(sweep_dir, data, sections, logger_cfg)
        except Exception as e:  # wandb trouble must not cost the report
            print(f"toylens-sweep-report: warning: wandb logging failed ({ix.one_line(e, 200)})", file=sys.stderr)
    out = write_page(sweep_dir / "sweep_report", data, sections)
    ix.update_index(sweep_dir)  # now links the report
    return out
