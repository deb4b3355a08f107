"""ablate_every_hook against seed 004's naive loop: speed ratio, exactness and peak memory.

The seed setting: 2 layers, d_model 64, d_head 64, 1 head, d_mlp 256, d_vocab 300, n_ctx 50, relu,
LN, positional "none", random init (seeded); mean ablation of the 39 hooks the seed's loop visits;
means from a reference batch of prev_token sequences, loss on another batch of the same size.

Both run in ONE process, interleaved as ours, naive, ours, so a change in machine load hits both;
the ratio (not the absolute seconds) is the number to read. Wall time and process CPU time are
both reported: CPU time is less sensitive to other processes sharing the cores. Peak memory is the
largest RSS above the phase's starting RSS, sampled by a psutil thread every 5 ms.

    python benchmarks/ablation_speed.py            # full size: 4000 x 50 (several minutes)
    python benchmarks/ablation_speed.py --quick    # 400 x 50 smoke run
"""

from __future__ import annotations

import argparse
import gc
import os
import threading
import time

import einops
import psutil
import torch

from toylens._compat import HookedTransformerConfig
from toylens.analyze.ablation import ablate_every_hook
from toylens.data import TASKS, make_task
from toylens.train.model import make_model

TARGET_SPEEDUP, TARGET_TOL, TARGET_MEMORY = 12.0, 1e-4, 0.25


def seed_model(seed: int):
    cfg = HookedTransformerConfig(n_layers=2, d_model=64, d_head=64, n_heads=1, d_mlp=256, d_vocab=300,
                                  n_ctx=50, act_fn="relu", normalization_type="LN", seed=seed)
    model = make_model(cfg, positional_embedding_type="none")
    model.eval()
    return model


def masked_loss(logits, batch) -> float:
    # For prev_token this is exactly the seed's loss_fn (positions 1.. against the previous token).
    logp = logits.log_softmax(-1).gather(-1, batch.targets[..., None])[..., 0]
    return -logp[batch.loss_mask].mean().item()


def naive_loop(model, batch, reference) -> dict[str, float]:
    """Seed 004, Step 7, as written there (minus autograd): cache the reference batch, then one
    run_with_hooks over the whole evaluation batch per hook."""
    with torch.inference_mode():
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4000, help="rows in each of the two batches (default 4000)")
    p.add_argument("--quick", action="store_true", help="smoke run: 400 rows")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    n = 400 if args.quick else args.batch

    model = seed_model(args.seed)
    task = make_task(TASKS["prev_token"].config_cls())
    reference = task.sample(n, torch.Generator().manual_seed(args.seed + 1))
    batch = task.sample(n, torch.Generator().manual_seed(args.seed + 2))
    print(f"seed setting, random init; batch {n} x {task.seq_len}, mean ablation; "
          f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}", flush=True)
    ours(seed_model(args.seed), batch[:8], reference[:8])  # warm-up (lazy init), not timed

    with Phase("ablate_every_hook #1") as o1:
        got = ours(model, batch, reference)
    with Phase("naive loop (seed 004)") as nv:
        want = naive_loop(model, batch, reference)
    with Phase("ablate_every_hook #2") as o2:
        got2 = ours(model, batch, reference)

    assert set(got) == set(want) == set(got2), (sorted(set(got) ^ set(want)))
    err = max(abs(got[h] - want[h]) for h in want)
    err2 = max(abs(got2[h] - got[h]) for h in got)
    wall = [nv.wall / o.wall for o in (o1, o2)]
    cpu = [nv.cpu / o.cpu for o in (o1, o2)]
    speedup = sum(wall) / 2
    mem_ratio = max(o1.mem_mb, o2.mem_mb) / nv.mem_mb
    print(f"hooks compared             {len(want)}")
    print(f"naive seconds              {nv.wall:.2f}")
    print(f"ours seconds               {o1.wall:.2f}, {o2.wall:.2f}")
    print(f"speed ratio (wall)         {wall[0]:.2f}x, {wall[1]:.2f}x   mean {speedup:.2f}x")
    print(f"speed ratio (cpu time)     {cpu[0]:.2f}x, {cpu[1]:.2f}x")
    print(f"max |dloss| ours vs naive  {err:.3g}   (ours run-to-run {err2:.3g})")
    print(f"peak memory                naive +{nv.mem_mb:.0f} MB, ours +{max(o1.mem_mb, o2.mem_mb):.0f} MB, "
          f"ratio {mem_ratio:.3f}")
    ok = speedup >= TARGET_SPEEDUP and err <= TARGET_TOL and mem_ratio <= TARGET_MEMORY
    print(f"{'PASS' if ok else 'FAIL'} (targets: >= {TARGET_SPEEDUP:g}x, <= {TARGET_TOL:g}, "
          f"memory <= {TARGET_MEMORY:g} of naive)")


if __name__ == "__main__":
    main()
