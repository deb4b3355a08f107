"""Sweep speed: one sweep of the seed experiment through ``hydra/launcher=local`` (one job after the
other, in one process) and through ``hydra/launcher=joblib`` with 2 worker processes.

Runs ``toylens-train -m seed=0,...,N-1 experiment=no_pos_prev_token`` as a user does (subprocess,
start-up included), in a fresh sweep directory each time, and prints the wall time of each, the
ratio local / joblib, and from the sweep index the time each run spent training (so the ratio can
be explained: process start-up vs training, and how training time changes when two runs share the
cores). Expect a ratio a little under the core count: local runs use torch's intra-op threads on
every core already, but small models use them poorly, and joblib pays its workers' start-up in
parallel while local pays one.

    python benchmarks/sweep_speed.py            # 8 runs of the experiment as configured (~400 steps each)
    python benchmarks/sweep_speed.py --quick    # 8 runs of 100 steps
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def sweep(launcher: list[str], runs: int, extra: list[str], root: Path) -> dict:
    sweep_dir = root / f"sweep_{launcher[0].split('=')[1]}"
    cmd = [sys.executable, "-m", "toylens.train.cli", "-m", f"seed={','.join(map(str, range(runs)))}",
           "experiment=no_pos_prev_token", "train.progress=false", "device=cpu", *extra, *launcher,
           f"hydra.sweep.dir={sweep_dir}"]
    env = dict(os.environ, WANDB_MODE="offline")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"sweep failed ({' '.join(launcher)}):\n{p.stderr[-3000:]}")
    index = json.loads((sweep_dir / "sweep.json").read_text())
    train_s = [r["wall_s"] for r in index["runs"]]
    return {"wall_s": wall, "train_s": train_s, "steps": [r["step"] for r in index["runs"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100 steps per run")
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    extra = ["train.steps=100", "train.stop_at_eval_loss=null"] if args.quick else []
    print(f"{args.runs} runs of experiment=no_pos_prev_token {' '.join(extra)} on {os.cpu_count()} cores")
    results = {}
    with tempfile.TemporaryDirectory(prefix="toylens-sweep-bench-") as tmp:
        for name, launcher in [("local", ["hydra/launcher=local"]),
                               ("joblib", ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.workers}"])]:
            r = sweep(launcher, args.runs, extra, Path(tmp))
            results[name] = r
            mean = statistics.mean(r["train_s"])
            print(f"  {name:7s} wall {r['wall_s']:7.1f} s   training per run: mean {mean:6.2f} s"
                  f" (sum {sum(r['train_s']):6.1f} s)   steps {sorted(set(r['steps']))}")
    loc, job = results["local"], results["joblib"]
    print(f"ratio local / joblib ({args.workers} workers): {loc['wall_s'] / job['wall_s']:.2f}x")
    outside_local = loc["wall_s"] - sum(loc["train_s"])
    outside_joblib = job["wall_s"] - sum(job["train_s"]) / args.workers
    print(f"  outside training (start-up, imports, index; joblib: also uneven ends): local {outside_local:.1f} s, "
          f"joblib {outside_joblib:.1f} s")
    print(f"  training one run: {statistics.mean(loc['train_s']):.2f} s alone (torch threads = cores) vs "
          f"{statistics.mean(job['train_s']):.2f} s in a worker (joblib caps it at cores // workers threads)")


if __name__ == "__main__":
    main()
