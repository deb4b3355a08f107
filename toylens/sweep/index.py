"""The sweep index: one record per run (``sweep_run.json``) and ``sweep.json`` rebuilt from them, under a lock.
Layout and record states: docs/internals.md, "Sweep index"."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from toylens.runs.checkpoint import write_json

RECORD = "sweep_run.json"
INDEX = "sweep.json"
LOCK = ".sweep.lock"
STATUSES = ("pending", "running", "finished", "failed", "interrupted")


class SweepError(ValueError):
    """A sweep directory that cannot be used as asked; the message is one line naming the fix."""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def one_line(e: BaseException | str, limit: int = 300) -> str:
    """An error as one line, cut at ``limit``. toylens's own errors (ValueError/RuntimeError
    subclasses) say what went wrong already; any other exception is prefixed with its type."""
    text = " ".join(str(e).split())
    if isinstance(e, BaseException):
        if not text:
            text = type(e).__name__
        elif not isinstance(e, (ValueError, RuntimeError)):
            text = f"{type(e).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- this process, for stale-record detection ------------------------------------------------------
def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5); the name in () may hold spaces


def process_info() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": _proc_start(os.getpid())}


def process_alive(rec: dict) -> bool | None:
    """Whether the process that wrote a ``running`` record still runs: None when it cannot be told
    (another host, e.g. a SLURM node)."""
    if rec.get("host") != socket.gethostname() or not isinstance(rec.get("pid"), int):
        return None
    pid = rec["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    start = _proc_start(pid)
    return start is None or rec.get("proc_start") in (None, start)


def effective_status(rec: dict) -> str:
    """``running`` becomes ``interrupted`` when its process is gone."""
    if rec.get("status") == "running" and process_alive(rec) is False:
        return "interrupted"
    return rec.get("status", "pending")


# --- per-run records -------------------------------------------------------------------------------
def read_record(run_dir: Path) -> dict | None:
    path = Path(run_dir) / RECORD
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # cannot happen with atomic writes; treat as no record (the job runs again)


def write_record(run_dir: Path, rec: dict) -> dict:
    rec = {**rec, "updated": now()}
    write_json(Path(run_dir) / RECORD, rec)
    return rec


# --- the index ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def locked(sweep_dir: Path):
    """An exclusive advisory lock on ``<sweep>/.sweep.lock`` (no-op where flock is unsupported)."""
    path = Path(sweep_dir) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except (ImportError, OSError):  # Windows, or a filesystem without locks: records stay atomic
            pass
        yield  # closing the file releases the lock


def sweep_overrides(sweep_dir: Path) -> list[str] | None:
    """The sweep's command-line overrides, from Hydra's ``multirun.yaml`` (None when absent), canonical: task file
    references made absolute against the directory the sweep was launched from (``canonical_overrides``)."""
    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return None
    cfg = OmegaConf.load(path)
    raw = [str(o) for o in OmegaConf.select(cfg, "hydra.overrides.task", default=[]) or []]
    return canonical_overrides(raw, OmegaConf.select(cfg, "hydra.runtime.cwd", default=None))


def unescape(value: str) -> str:
    """A value as typed: Hydra's sweeper escapes special characters in a job's values (``majority.py\\:Majority``)."""
    return re.sub(r"\\(.)", r"\1", value)


def canonical_overrides(overrides: list[str], base: str | Path | None) -> list[str]:
    """``overrides`` with each ``task=`` value unescaped and a task file reference made absolute against ``base`` (the
    directory the command ran in; None: this process's), so a sweep launched as ``task=majority.py:Majority`` from
    one directory is the same sweep as ``task=/abs/majority.py:Majority`` from another. A swept list
    (``task=a.py:A,b.py:B``) is canonicalised value by value."""
    from toylens.refs import canonical

    out = []
    for o in overrides:
        key, eq, value = o.partition("=")
        if eq and key.lstrip("+~") == "task":
            values = re.split(r"(?<!\\),", value)  # an escaped comma belongs to its value
            o = f"{key}={','.join(canonical(unescape(v.strip()), base) for v in values)}"
        out.append(o)
    return out


def _launcher(sweep_dir: Path) -> str | None:
    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return None
    cfg = OmegaConf.load(path)
    choice = OmegaConf.select(cfg, "hydra.runtime.choices", default=None)
    name = choice.get("hydra/launcher") if choice is not None else None
    return name or OmegaConf.select(cfg, "hydra.launcher._target_", default=None)


def _params(overrides: list[str]) -> dict[str, str]:
    out = {}
    for o in overrides:
        if "=" in o and not o.lstrip("+~").startswith("hydra."):
            key, value = o.split("=", 1)
            out[key.lstrip("+~")] = unescape(value)  # shown as typed, not as Hydra's sweeper escaped it
    return out


def _run_entry(num: int, run_dir: Path | None, rec: dict) -> dict:
    status = effective_status(rec) if run_dir is not None else "pending"
    entry = {"num": num, "dir": run_dir.name if run_dir is not None else str(num), "status": status}
    for key in ("overrides", "error", "error_type", "step", "eval_loss", "eval_accuracy", "stopped_early",
                "started", "ended", "wall_s", "launches", "resumed_from", "wandb_group", "pid", "host"):
        if key in rec:
            entry[key] = rec[key]
    entry["params"] = _params(entry.get("overrides") or [])
    return entry


def build_index(sweep_dir: Path, planned: list[list[str]] | None = None) -> dict:
    """The index as a dict, from the records under ``sweep_dir``. Jobs without a record are
    ``pending``: those of ``planned`` (every job's overrides, by job number) or, when None, those the
    previous index listed."""
    sweep_dir = Path(sweep_dir).resolve()
    records: dict[int, tuple[Path, dict]] = {}
    for rec_path in sweep_dir.glob(f"*/{RECORD}"):
        rec = read_record(rec_path.parent)
        if rec is not None and isinstance(rec.get("num"), int):
            records[rec["num"]] = (rec_path.parent, rec)
    if planned is not None:
        plan = dict(enumerate(planned))
    else:
        old = read_index(sweep_dir) or {}
        plan = {r["num"]: r.get("overrides") or [] for r in old.get("runs", []) if isinstance(r.get("num"), int)}
    runs = []
    for num in sorted(set(records) | set(plan)):
        run_dir, rec = records.get(num, (None, None))
        if rec is None:
            rec = {"overrides": list(plan[num])}
        runs.append(_run_entry(num, run_dir, rec))
    varied = sorted({k for r in runs for k in r["params"]
                     if len({str(x["params"].get(k)) for x in runs}) > 1})
    for r in runs:
        swept = " ".join(f"{k}={r['params'].get(k)}" for k in varied)
        r["label"] = f"{r['num']}: {swept}" if varied else str(r["num"])
    counts = {s: sum(r["status"] == s for r in runs) for s in STATUSES}
    index: dict[str, Any] = {
        "toylens_sweep": 1,
        "sweep_dir": str(sweep_dir),
        "launcher": _launcher(sweep_dir),
        "overrides": sweep_overrides(sweep_dir),
        "varied": varied,
        "counts": counts,
        "n_runs": len(runs),
        "updated": now(),
        "runs": runs,
    }
    if (sweep_dir / "sweep_report" / "report.json").is_file():
        index["report"] = {"html": "sweep_report/index.html", "json": "sweep_report/report.json"}
    return index


def update_index(sweep_dir: Path, planned: list[list[str]] | None = None) -> dict:
    """Rebuild ``<sweep>/sweep.json`` from the records, under the sweep's lock; returns the index."""
    with locked(sweep_dir):
        index = build_index(sweep_dir, planned)
        write_json(Path(sweep_dir) / INDEX, index)
    return index


def read_index(sweep_dir: Path) -> dict | None:
    try:
        return json.loads((Path(sweep_dir) / INDEX).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def summary_line(index: dict) -> str:
    """``4 runs: 3 finished, 1 failed (3: seed=3: <error>)``: what the multirun says at the end."""
    c = index["counts"]
    parts = [f"{c[s]} {s}" for s in STATUSES if c.get(s)]
    line = f"{index['n_runs']} runs: {', '.join(parts) or 'none'}"
    bad = [r for r in index["runs"] if r["status"] in ("failed", "interrupted")]
    if bad:
        r = bad[0]
        more = f"; and {len(bad) - 1} more" if len(bad) > 1 else ""
        line += f" (job {r['label']}: {r.get('error') or r['status']}{more})"
    return line
