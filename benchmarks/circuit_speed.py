"""Circuit discovery: toylens against the slow references (toylens.analyze.discovery.reference: TransformerLens's
forward with hooks, one full forward per evaluation), in one process, interleaved; time and max difference.

Settings: "seed" (2 layers, d_model 64, 1 head of 64, d_mlp 256, LN, positional none, d_vocab 300, 50 positions,
prev_token pairs) and "attn8" (2 attention-only layers, 8 heads of 8, d_model 64, induction pairs); batch 64,
random weights of non-trivial scale. Targets (issue "circuit discovery"): EAP on the seed model under 0.2 s;
ACDC >= 10x the naive loop with the same circuit.

    python benchmarks/circuit_speed.py            # both settings, medians of 3
    python benchmarks/circuit_speed.py --quick    # one repeat, batch 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from toylens.analyze.discovery import EdgeRunner, methods, reference
from toylens.analyze.prompts import pairs_from_task
from toylens.data import TASKS, make_task
from toylens.model.zoo import random_model


def setting(name: str, batch: int):
    if name == "seed":
        model = random_model("pos-none", n_layers=2, d_model=64, n_heads=1, d_head=64, d_mlp=256, d_vocab=300,
                             n_ctx=50)
        task = make_task(TASKS["prev_token"].config_cls(d_vocab=300, seq_len=50))
    else:
        task = make_task(TASKS["induction"].config_cls())
        model = random_model("attn-only", n_layers=2, d_model=64, n_heads=8, d_head=8, n_ctx=task.seq_len,
                             d_vocab=task.d_vocab)
    return model, pairs_from_task(task, batch, seed=0)


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threshold", type=float, default=0.05, help="ACDC threshold on |logit diff change|")
    args = p.parse_args()
    torch.set_num_threads(1)
    batch, repeats = (16, 1) if args.quick else (64, 3)
    print(f"batch {batch}, medians of {repeats}, torch threads 1")
    for name in ("seed", "attn8"):
        model, pairs = setting(name, batch)
        split = reference.split_model(model)
        t_runner, runner = timed(lambda model=model, pairs=pairs: EdgeRunner(model, pairs), repeats)
        g = runner.graph
        print(f"\n[{name}] {g.n_edges} edges; EdgeRunner set-up (clean + corrupted runs) {t_runner:.3f} s")
        t_naive, want = timed(lambda split=split, pairs=pairs, g=g: reference.eap(split, pairs, g), 1)
        t_ours, got = timed(lambda runner=runner: methods.eap(runner), repeats)
        print(f"  EAP        toylens {t_ours:.3f} s   naive autograd {t_naive:.3f} s   "
              f"ratio {t_naive / t_ours:5.1f}x   max |diff| {float((got - want).abs().max()):.2e}")
        t_ig, _ = timed(lambda runner=runner: methods.eap_ig(runner, 5), repeats)
        print(f"  EAP-IG(5)  toylens {t_ig:.3f} s")
        t_naive, (kept_n, scores_n) = timed(
            lambda split=split, pairs=pairs, g=g: reference.acdc(split, pairs, g, args.threshold), 1)
        t_ours, (kept, scores) = timed(lambda runner=runner: methods.acdc(runner, args.threshold), repeats)
        same = bool(torch.equal(kept, kept_n))
        print(f"  ACDC       toylens {t_ours:.3f} s   naive loop {t_naive:.3f} s   ratio {t_naive / t_ours:5.1f}x   "
              f"same circuit: {same} ({int(kept.sum())} edges)   max |score diff| "
              f"{float((scores - scores_n).abs().max()):.2e}")
    print("\nauto-circuit 1.0.1: not run here (it needs tracr-pypi with jax and dm-haiku, and a shim for "
          "transformer_lens.past_key_value_caching, removed in TransformerLens 3.9); see benchmarks/README.md")


if __name__ == "__main__":
    main()
