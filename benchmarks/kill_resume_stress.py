"""Kill-and-resume stress: SIGKILL ``toylens-train`` at random moments (half of them inside a checkpoint
write: the process kills itself from within its N-th atomic write, after the temp file is written or
half of it, before the rename), resume until done, and compare with an uninterrupted run bit for bit.

    python benchmarks/kill_resume_stress.py [--trials 20] [--seed 0] [--steps 60]

Each ``toylens-train`` is the real CLI (``toylens.train.cli.main``) in a process forked from this one,
so imports are paid once. Prints one line per trial and a summary: differences (final weights or
metrics.jsonl not identical to the uninterrupted run) and corrupt checkpoints (a listed checkpoint
that fails to load or to match its checksum, checked after every kill). Both must be 0. Not run by CI.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

from toylens.runs import checkpoint as ck
from toylens.train import cli

ARGS = ["experiment=no_pos_prev_token", "model.d_model=32", "model.d_head=16", "model.n_heads=2", "model.d_mlp=64",
        "task.d_vocab=20", "task.seq_len=12", "train.batch_size=32", "train.eval_every=25", "train.eval_size=64",
        "train.log_every=5", "train.checkpoint_every=1", "train.keep_last=3", "train.stop_at_eval_loss=null",
        "train.progress=false", "device=cpu", "logger=none", "threads=1"]


def _die_inside_write(n: int, phase: str) -> None:
    """Make this process SIGKILL itself inside its n-th atomic write (after writing all or half of the temp
    file, before the rename): a moment that a kill from outside rarely hits."""
    orig, count = ck.atomic_write, [0]

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


def start(argv: list[str], cwd: Path, die_in_write: tuple[int, str] | None = None) -> int:
    """Fork a ``toylens-train argv`` (stdout/stderr to a log in cwd); returns its pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.chdir(cwd)
        log = os.open(cwd / "train.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        if die_in_write:
            _die_inside_write(*die_in_write)
        sys.argv = ["toylens-train", *argv]
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        os._exit(code)


def wait(pid: int, timeout: float | None = None) -> int | None:
    """Exit code (negative: killed by that signal), or None when still running after ``timeout`` s."""
    t0 = time.time()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if timeout is not None and time.time() - t0 > timeout:
            return None
        time.sleep(0.002)


def corrupt_checkpoints(run: Path) -> list[int]:
    bad = []
    for step in ck.list_checkpoints(run):
        try:
            ck.load_weights(run, step)
            ck.load_state(run, step)
        except ck.CheckpointError:
            bad.append(step)
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="toylens-stress-"))
    base = [*ARGS, f"train.steps={args.steps}"]
    torch.set_num_threads(1)

    t0 = time.time()
    ref = work / "reference"
    assert wait(start([*base, f"hydra.run.dir={ref}"], work)) == 0, (work / "train.log").read_text()[-2000:]
    wall = time.time() - t0
    ref_w, ref_m = ck.load_weights(ref, args.steps), ck.read_metrics(ref)
    print(f"uninterrupted run: {wall:.1f} s for {args.steps} steps (a checkpoint every step, 3 kept); "
          f"{args.trials} trials in {work}", flush=True)

    diffs = corrupt = kills = writes = 0
    for i in range(args.trials):
        run = work / f"trial{i:02d}"
        argv = [*base, f"hydra.run.dir={run}"]
        moments = []
        for attempt in range(6):  # kill the first process and, sometimes, a resume too
            die = None
            if i % 2 == 1 and attempt == 0:  # 2 writes per checkpoint (state, weights) + config/metrics writes
                die = (rng.randint(1, 2 * args.steps), rng.choice(["full", "half"]))
            delay = rng.uniform(0.05, 0.95) * wall  # wall: how long the last whole run took
            t_start = time.time()
            pid = start(argv, work, die)
            code = wait(pid, None if die else delay)
            if code == 0 and attempt == 0:
                wall = time.time() - t_start
            if code is None:
                os.kill(pid, signal.SIGKILL)
                code = wait(pid)
                hit = f"at {delay:.2f}s"
            else:
                hit = f"inside write {die[0]} ({die[1]})" if die and code == -signal.SIGKILL else "after exit"
            bad = corrupt_checkpoints(run) if run.exists() else []
            corrupt += len(bad)
            if code == -signal.SIGKILL:
                kills += 1
                writes += hit.startswith("inside")
                moments.append(hit + (f" CORRUPT {bad}" if bad else ""))
            elif code != 0:
                raise SystemExit(f"trial {i}: toylens-train exited {code}; see {work / 'train.log'}")
            if code == 0:
                break
            started = (run / ".hydra" / "config.yaml").is_file()
            argv = [f"resume={run}"] if started else [*base, f"hydra.run.dir={run}"]
            if rng.random() < 0.6:  # most resumes run to the end
                t_start = time.time()
                code = wait(start(argv, work))
                wall = time.time() - t_start if argv[0].startswith("experiment=") else wall
                if code != 0:
                    raise SystemExit(f"trial {i}: resume exited {code}; see {work / 'train.log'}")
                break
        else:
            assert wait(start([f"resume={run}"], work)) == 0
        w = ck.load_weights(run, args.steps)
        same = all(torch.equal(ref_w[k], w[k]) for k in ref_w) and ck.read_metrics(run) == ref_m
        diffs += not same
        print(f"trial {i:2d}: killed {len(moments)}x ({'; '.join(moments)}) -> "
              f"{'identical' if same else 'DIFFERENT'}", flush=True)
    print(f"SUMMARY: {args.trials} trials, {kills} kills ({writes} inside a checkpoint write), "
          f"{diffs} differences, {corrupt} corrupt checkpoints; {time.time() - t0:.0f} s")
    sys.exit(1 if diffs or corrupt else 0)


if __name__ == "__main__":
    main()
