"""The LLC at every checkpoint of a run (``toylens.analyze.llc_over_checkpoints``, default ``llc.*`` settings),
beside the run's own eval loss, and the stages ``toylens.analyze.stages`` reads off the curve.

    python benchmarks/llc_curves.py RUN_DIR [RUN_DIR ...]     # e.g. an induction_heads and a grokking run
    python benchmarks/llc_curves.py RUN_DIR --set lr=3e-4       # an llc.* override

Train the runs first, e.g. ``toylens-train experiment=induction_heads checkpoint_root=/tmp/llc_runs`` (its default
checkpoint_every=15 gives 24 checkpoints) and ``toylens-train experiment=grokking checkpoint_root=/tmp/llc_runs``.
One torch thread (the 2-core machine is shared). Prints a table per run, the seconds per checkpoint and the stages.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from toylens.analyze.learning_coefficient import LLCConfig, llc_over_checkpoints
from toylens.analyze.stages import describe, find_stages
from toylens.runs.checkpoint import read_metrics
from toylens.runs.run import load_run


def eval_loss_by_step(run_dir: str) -> dict[int, float]:
    out = {}
    for row in read_metrics(run_dir):
        if "eval/loss" in row:
            out[int(row["step"])] = float(row["eval/loss"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--set", nargs="*", default=[], help="llc.* overrides, e.g. lr=3e-4 num_draws=128")
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = LLCConfig()
    over = {}
    for kv in args.set:
        k, v = kv.split("=", 1)
        over[k] = type(getattr(base, k))(float(v) if isinstance(getattr(base, k), (int, float)) else v)
    summary = []
    for path in args.runs:
        run = load_run(path)
        t0 = time.perf_counter()
        res = llc_over_checkpoints(run, progress=False, **over)
        total = time.perf_counter() - t0
        losses = eval_loss_by_step(path)
        used = res.settings
        print(f"\n{path} (task {run.task.name}): {len(res.steps)} checkpoints in {total:.1f} s "
              f"({res.seconds_per_checkpoint:.2f} s each, calibration {res.calibration_s:.1f} s)")
        print(f"settings: lr {used['lr']:g} (pilots {used.get('lr_pilots', 'none: given')}), {used['num_chains']} "
              f"chains x {used['num_draws']} draws, n_beta {used['n_beta']:g}, localization {used['localization']:g}")
        print(f"{'step':>6} {'LLC':>9} {'± std':>7} {'init loss':>10} {'eval loss':>10}  health")
        for i, s in enumerate(res.steps):
            warn = ",".join(w["check"] for w in res.warnings.get(s, [])) or "ok"
            print(f"{s:>6} {float(res.llc_mean[i]):>9.2f} {float(res.llc_std[i]):>7.2f} "
                  f"{float(res.init_loss[i]):>10.4f} {losses.get(s, math.nan):>10.4f}  {warn}")
        keep = [i for i, v in enumerate(res.usable_mean()) if v == v]  # diverged checkpoints left out
        ks = [res.steps[i] for i in keep]
        st = describe(find_stages(ks, [res.usable_mean()[i] for i in keep]), ks,
                      {"init loss": [float(res.init_loss[i]) for i in keep]})
        print("stages:")
        for x in st:
            print("  " + x["text"])
        summary.append({"run": path, "task": run.task.name, "steps": res.steps,
                        "llc_mean": [round(float(v), 3) for v in res.llc_mean],
                        "seconds_per_checkpoint": round(res.seconds_per_checkpoint, 2),
                        "calibration_s": round(res.calibration_s, 1), "lr": used["lr"],
                        "diverged": res.diverged_steps(),
                        "stages": [{k: x[k] for k in ("from_step", "to_step", "kind")} for x in st]})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
