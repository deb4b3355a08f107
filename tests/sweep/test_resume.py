"""A sweep killed with SIGKILL mid-run, then re-run with the same command: finished runs are skipped
(their files untouched), the killed run resumes from its last checkpoint, the run never started
runs, and a run whose config is invalid is recorded as failed (local launcher: one process)."""

from __future__ import annotations

import json
import signal
import subprocess
import time

from toylens.runs import checkpoint as ck
from toylens.sweep import index as ix

from .conftest import TINY, env, run_train, train_cmd


def _files(d):
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}


def test_killed_sweep_resumes_unfinished_runs_and_skips_finished_ones(tmp_path):
    sweep = tmp_path / "sweep"
    # job 0: 20 steps; job 1: 300 steps (killed mid-way); job 2: train.steps=0, invalid
    args = ["-m", "train.steps=20,300,0", *TINY, "train.checkpoint_every=20", "train.keep_last=100",
            "train.eval_every=50", "train.stop_at_eval_loss=null", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(train_cmd(*args), cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not any(s >= 60 for s in ck.list_checkpoints(sweep / "1")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = ck.list_checkpoints(sweep / "1")
    assert killed_at and killed_at[-1] < 300, f"job 1 was not killed mid-way: {killed_at}"
    index = ix.update_index(sweep)
    assert [r["status"] for r in index["runs"]] == ["finished", "interrupted", "pending"]
    assert index["runs"][2]["overrides"][0] == "train.steps=0"  # planned before the kill
    job0 = _files(sweep / "0")
    early = {s: ck.weights_path(sweep / "1", s).stat().st_mtime_ns for s in killed_at}

    p = run_train(args, cwd=tmp_path)  # the same command again
    assert p.returncode == 1, p.stderr[-3000:]  # job 2 failed (invalid config): the sweep says so
    assert "job 0 [train.steps=20" in p.stderr and "already finished (step 20): skipped" in p.stderr
    index = json.loads((sweep / "sweep.json").read_text())
    runs = index["runs"]
    assert [r["status"] for r in runs] == ["finished", "finished", "failed"]
    assert _files(sweep / "0") == job0  # the finished run was not touched
    assert runs[0]["launches"] == 1 and runs[1]["launches"] == 2
    assert runs[1]["resumed_from"] == killed_at[-1] and runs[1]["step"] == 300
    assert all(ck.weights_path(sweep / "1", s).stat().st_mtime_ns == t for s, t in early.items())  # resumed
    assert ck.list_checkpoints(sweep / "1") == list(range(20, 301, 20))
    steps = [r["step"] for r in ck.read_metrics(sweep / "1")]
    assert steps == list(range(5, 301, 5))  # every log step once: the resumed run truncated and continued the log
    assert "train.steps=0 must be positive" in runs[2]["error"] and runs[2]["error_type"] == "ConfigError"
    assert not (sweep / "2" / "ckpt").exists()
