"""ablate_every_hook against seed 004's naive loop: speed ratio, exactness and peak memory.

The seed setting: 2 layers, d_model 64, d_head 64, 1 head, d_mlp 256, d_vocab 300, n_ctx 50, relu,
LN, positional "none", random init (seeded); mean ablation of the 39 hooks the seed's loop visits;
means from a reference batch of prev_token sequences, loss on another batch of the same size.

Two naive baselines: "seed" is seed 004's loop as the notebook runs it (autograd on, as in the
notebook: every run_with_hooks records a graph); "no-grad" is the same loop under
torch.inference_mode(), the stricter baseline. PASS is judged against "seed"; the no-grad ratio
is printed beside it.

The timings run in ONE process, interleaved as naive (seed), ours, naive (no-grad), ours, so a
change in machine load hits all; the ratio (not the absolute seconds) is the number to read. Wall
time and process CPU time are both reported: CPU time is less sensitive to other processes sharing
the cores. Peak memory is the largest RSS above the phase's starting RSS, sampled by a psutil
thread every 5 ms; a phase that follows another can reuse heap the earlier one left behind, so
ours is also measured alone in a fresh subprocess (the figure used for the memory target), and
the judged naive baseline runs first.

    python benchmarks/ablation_speed.py            # full size: 4000 x 50 (several minutes)
    python benchmarks/ablation_speed.py --quick    # 400 x 50 smoke run

The targets are meant for the full size: at 400 rows the naive loop does not yet pay the
large-batch allocation cost that dominates it at 4000, so --quick checks that everything runs.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import threading
import time

import einops
import psutil
import torch

from toylens._compat import HookedTransformerConfig
from toylens.analyze.ablation import ablate_every_hook
from toylens.data import TASKS, make_task
from toylens.model.build import make_model

TARGET_SPEEDUP, TARGET_TOL, TARGET_MEMORY = 12.0, 1e-4, 0.25


def seed_model(seed: int):
    cfg = HookedTransformerConfig(n_layers=2, d_model=64, d_head=64, n_heads=1, d_mlp=256, d_vocab=300,
                                  n_ctx=50, act_fn="relu", normalization_type="LN", seed=seed)
    model = make_model(cfg, positional_embedding_type="none")
    model.eval()
    return model


def masked_loss(logits, batch) -> float:
    # For prev_token this is exactly the seed's loss_fn (positions 1.. against the previous token).
    with torch.no_grad():
        logp = logits.log_softmax(-1).gather(-1, batch.targets[..., None])[..., 0]
        return -logp[batch.loss_mask].mean().item()


def naive_loop(model, batch, reference, grad: bool = True) -> dict[str, float]:
    """Seed 004, Step 7, as written there: cache the reference batch, then one run_with_hooks over
    the whole evaluation batch per hook. ``grad=False``: the same under inference mode."""
    with torch.enable_grad() if grad else torch.inference_mode():
        _, cache = model.run_with_cache(reference.tokens)
        losses = {}
        for hook_name in model.hook_dict:
            if hook_name in cache and hook_name != "hook_pos_embed" and "result" not in hook_name:
                average_act = cache[hook_name].mean(0)

                def replacing_with_average_act(activation, hook, average_act=average_act):
                    activation[:] = einops.repeat(average_act, "... -> batch ...", batch=batch.tokens.size(0))
                    return activation

                logits = model.run_with_hooks(batch.tokens, fwd_hooks=[(hook_name, replacing_with_average_act)])
                losses[hook_name] = masked_loss(logits, batch)
                del logits
        del cache
    return losses


def ours(model, batch, reference) -> dict[str, float]:
    res = ablate_every_hook(model, batch, reference=reference, modes=("mean",), progress=False)
    return {r.hook: r.loss for r in res.rows}


class Phase:
    """Wall time, process CPU time and peak RSS increase of a block of code."""

    def __init__(self, name: str):
        self.name = name
        self.proc = psutil.Process()

    def __enter__(self):
        gc.collect()
        self.base = self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        self.load = os.getloadavg()[0]
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def _sample(self):
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.mem_mb = (self.peak - self.base) / 2**20
        print(f"{self.name:<24} wall {self.wall:8.2f} s   cpu {self.cpu:8.2f} s   "
              f"peak RSS +{self.mem_mb:7.1f} MB   (load avg at start {self.load:.2f})", flush=True)


def setup(n: int, seed: int):
    model = seed_model(seed)
    task = make_task(TASKS["prev_token"].config_cls())
    reference = task.sample(n, torch.Generator().manual_seed(seed + 1))
    batch = task.sample(n, torch.Generator().manual_seed(seed + 2))
    ours(seed_model(seed), batch[:8], reference[:8])  # warm-up (lazy init), not timed
    return model, batch, reference


def memory_probe(n: int, seed: int) -> float:
    """Peak RSS increase of ours alone, in a fresh process (no heap left behind by other phases)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import ablation_speed as b; "
            "m, x, r = b.setup(int(sys.argv[2]), int(sys.argv[3])); ph = b.Phase('ablate_every_hook (alone)'); "
            "ph.__enter__(); b.ours(m, x, r); ph.__exit__(None, None, None); print('MEM', ph.mem_mb)")
    out = subprocess.run([sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__)), str(n), str(seed)],
                         capture_output=True, text=True, check=True).stdout
    print(out.strip().splitlines()[-2], flush=True)
    return float(out.strip().splitlines()[-1].split()[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4000, help="rows in each of the two batches (default 4000)")
    p.add_argument("--quick", action="store_true", help="smoke run: 400 rows")
    p.add_argument("--naive", choices=["seed", "no-grad", "both"], default="both", help="naive baselines to run")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    n = 400 if args.quick else args.batch

    model, batch, reference = setup(n, args.seed)
    print(f"seed setting, random init; batch {n} x 50, mean ablation; "
          f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}", flush=True)
    names = ["seed", "no-grad"] if args.naive == "both" else [args.naive]
    naive: dict[str, tuple[Phase, dict]] = {}
    runs: list[tuple[Phase, dict]] = []
    for i, name in enumerate(names if len(names) == 2 else names * 2):
        if name not in naive:
            with Phase(f"naive loop ({name})") as ph:
                want = naive_loop(model, batch, reference, grad=name == "seed")
            naive[name] = ph, want
        with Phase(f"ablate_every_hook #{i + 1}") as o:
            runs.append((o, ours(model, batch, reference)))
    ours_mem = memory_probe(n, args.seed)

    (o1, got), (o2, got2) = runs
    ours_wall, ours_cpu = (o1.wall + o2.wall) / 2, (o1.cpu + o2.cpu) / 2
    print(f"ours seconds               {o1.wall:.2f}, {o2.wall:.2f}   (run-to-run spread "
          f"{abs(o1.wall - o2.wall) / ours_wall:.0%}; max |dloss| between runs "
          f"{max(abs(got2[h] - got[h]) for h in got):.3g})")
    verdict = {}
    for name, (ph, want) in naive.items():
        assert set(got) == set(want) == set(got2), sorted(set(got) ^ set(want))
        err = max(abs(got[h] - want[h]) for h in want)
        speed, mem = ph.wall / ours_wall, ours_mem / ph.mem_mb
        print(f"--- vs naive ({name}), {len(want)} hooks")
        print(f"naive seconds              {ph.wall:.2f}")
        print(f"speed ratio (wall)         {ph.wall / o1.wall:.2f}x, {ph.wall / o2.wall:.2f}x   mean {speed:.2f}x")
        print(f"speed ratio (cpu time)     {ph.cpu / ours_cpu:.2f}x")
        print(f"max |dloss| ours vs naive  {err:.3g}")
        print(f"peak memory                naive +{ph.mem_mb:.0f} MB, ours alone +{ours_mem:.0f} MB, ratio {mem:.3f}")
        verdict[name] = speed >= TARGET_SPEEDUP and err <= TARGET_TOL and mem <= TARGET_MEMORY
    judged = names[0]
    others = ", ".join(f"vs {k}: {'pass' if v else 'fail'}" for k, v in verdict.items() if k != judged)
    print(f"{'PASS' if verdict[judged] else 'FAIL'} vs naive ({judged}) (targets: >= {TARGET_SPEEDUP:g}x, "
          f"<= {TARGET_TOL:g}, memory <= {TARGET_MEMORY:g} of naive){'; ' + others if others else ''}")


if __name__ == "__main__":
    main()
