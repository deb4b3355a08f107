"""Kill-and-resume stress: SIGKILL ``toylens-train`` at random moments (half of them inside a checkpoint
write: the process kills itself from within its N-th atomic write, after the temp file is written or
half of it, before the rename), resume until done, and compare with an uninterrupted run bit for bit.

    python benchmarks/kill_resume_stress.py [--trials 20] [--seed 0] [--steps 150]

Prints one line per trial and a summary: differences (final weights or metrics.jsonl not identical to
the uninterrupted run) and corrupt checkpoints (a listed checkpoint that fails to load or to match its
checksum, checked after every kill). Both must be 0. Not run by CI (minutes of wall time).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from toylens.runs import checkpoint as ck

ARGS = ["experiment=no_pos_prev_token", "model.d_model=32", "model.d_head=16", "model.n_heads=2", "model.d_mlp=64",
        "task.d_vocab=20", "task.seq_len=12", "train.batch_size=32", "train.eval_every=25", "train.eval_size=64",
        "train.log_every=5", "train.checkpoint_every=1", "train.keep_last=3", "train.stop_at_eval_loss=null",
        "train.progress=false", "device=cpu", "logger=none"]


def cli(*extra: str) -> list[str]:
    return [sys.executable, "-m", "toylens.train.cli", *extra]


# toylens-train, SIGKILLing itself inside its N-th atomic write (a kill that polling from outside rarely hits)
_SELF_KILL = """
import os, signal, sys
from toylens.runs import checkpoint as ck
n, phase, count, orig = int(os.environ["STRESS_WRITE"]), os.environ["STRESS_PHASE"], [0], ck.atomic_write
def atomic_write(path, write):
    count[0] += 1
    if count[0] != n:
        return orig(path, write)
    def dying(tmp):
        write(tmp)
        if phase == "half":
            os.truncate(tmp, os.path.getsize(tmp) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(path, dying)
ck.atomic_write = atomic_write
from toylens.train.cli import main
sys.argv = ["toylens-train", *sys.argv[1:]]
main()
"""


def cli_dying_in_write(*extra: str) -> list[str]:
    return [sys.executable, "-c", _SELF_KILL, *extra]


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0", WANDB_MODE="disabled")


def corrupt_checkpoints(run: Path) -> list[int]:
    bad = []
    for step in ck.list_checkpoints(run):
        try:
            ck.load_weights(run, step)
            ck.load_state(run, step)
        except ck.CheckpointError:
            bad.append(step)
    return bad


def kill_at(cmd: list[str], cwd: Path, delay: float, extra_env: dict | None = None) -> tuple[int | None, str]:
    """Start ``cmd``; SIGKILL it after ``delay`` s unless it ends (or kills itself) first.
    Returns (exit code, or None when killed; what the kill hit)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env={**env(), **(extra_env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < delay:
        time.sleep(0.005)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return None, f"at {delay:.1f}s"
    if proc.returncode == -signal.SIGKILL:
        return None, f"inside write {extra_env['STRESS_WRITE']} ({extra_env['STRESS_PHASE']})"
    return proc.returncode, "after exit"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="toylens-stress-"))
    base = [*ARGS, f"train.steps={args.steps}"]

    t0 = time.time()
    ref = work / "reference"
    subprocess.run(cli(*base, f"hydra.run.dir={ref}"), cwd=work, env=env(), check=True, capture_output=True)
    wall = time.time() - t0
    ref_w, ref_m = ck.load_weights(ref, args.steps), ck.read_metrics(ref)
    print(f"uninterrupted run: {wall:.1f} s, {args.steps} steps; {args.trials} trials in {work}")

    diffs = corrupt = kills = writes = 0
    for i in range(args.trials):
        run = work / f"trial{i:02d}"
        in_write = i % 2 == 1
        cmd = cli(*base, f"hydra.run.dir={run}")
        moments = []
        for attempt in range(6):  # kill the first process and, sometimes, a resume too
            delay = rng.uniform(0.3, 1.0) * wall
            extra = None
            if in_write and attempt == 0:  # 2 writes per checkpoint (state, weights) + config/metrics writes
                extra = {"STRESS_WRITE": str(rng.randint(1, 2 * args.steps)),
                         "STRESS_PHASE": rng.choice(["full", "half"])}
                cmd, delay = cli_dying_in_write(*cmd[3:]), 10 * wall
            code, hit = kill_at(cmd, work, delay, extra)
            bad = corrupt_checkpoints(run) if run.exists() else []
            corrupt += len(bad)
            if code is None:
                kills += 1
                writes += hit.startswith("inside")
                moments.append(hit + (f" CORRUPT {bad}" if bad else ""))
            elif code != 0:
                raise SystemExit(f"trial {i}: toylens-train exited {code}")
            if code == 0:
                break
            started = (run / ".hydra" / "config.yaml").is_file()
            cmd = cli(f"resume={run}") if started else cli(*base, f"hydra.run.dir={run}")
            if rng.random() < 0.7:  # most resumes run to the end
                p = subprocess.run(cmd, cwd=work, env=env(), capture_output=True, text=True)
                if p.returncode != 0:
                    raise SystemExit(f"trial {i}: resume failed: {p.stderr.strip()[-300:]}")
                break
        else:
            subprocess.run(cli(f"resume={run}"), cwd=work, env=env(), check=True, capture_output=True)
        w = ck.load_weights(run, args.steps)
        same = all(torch.equal(ref_w[k], w[k]) for k in ref_w) and ck.read_metrics(run) == ref_m
        diffs += not same
        print(f"trial {i:2d}: killed {len(moments)}x ({'; '.join(moments)}) -> "
              f"{'identical' if same else 'DIFFERENT'}")
    print(f"SUMMARY: {args.trials} trials, {kills} kills ({writes} during a checkpoint write), "
          f"{diffs} differences, {corrupt} corrupt checkpoints; {time.time() - t0:.0f} s")
    sys.exit(1 if diffs or corrupt else 0)


if __name__ == "__main__":
    main()
