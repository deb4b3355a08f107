"""Circuit discovery: toylens against the slow references (toylens.analyze.discovery.reference: TransformerLens's
forward with hooks, one full forward per evaluation), in one process, interleaved; time and max difference.

Settings: "seed" (2 layers, d_model 64, 1 head of 64, d_mlp 256, LN, positional none, d_vocab 300, 50 positions,
prev_token pairs) and "attn8" (2 attention-only layers, 8 heads of 8, d_model 64, induction pairs); batch 64,
random weights of non-trivial scale; every answer at the last position (auto-circuit reads only that one).
Targets (issue "circuit discovery"): EAP on the seed model under 0.2 s; ACDC >= 10x the naive loop and than
auto-circuit, with the same circuit; EAP-IG (5 steps) >= 10x auto-circuit's integrated gradients.

    python benchmarks/circuit_speed.py                              # both settings, medians of 3
    python benchmarks/circuit_speed.py --quick                      # one repeat, batch 16
    python benchmarks/circuit_speed.py --auto-circuit /tmp/acpkgs   # and auto-circuit 1.0.1 beside (see
                                                                    # benchmarks/auto_circuit_side.py)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from auto_circuit_side import AutoCircuit, load

from toylens.analyze.discovery import EdgeRunner, methods, reference
from toylens.analyze.pairs import PromptPairs
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
    return model, last_position_pairs(task, batch)


def last_position_pairs(task, batch: int) -> PromptPairs:
    """``batch`` pairs whose answers share one position (the commonest), cut just after it."""
    many = pairs_from_task(task, max(batch, 16) * 16, seed=0)
    pos = int(many.answer_pos.mode().values)
    rows = (many.answer_pos == pos).nonzero()[:batch, 0]
    if len(rows) < batch:
        raise SystemExit(f"only {len(rows)} pairs answer at position {pos}; lower the batch")
    return PromptPairs(many.clean[rows, :pos + 1], many.corrupted[rows, :pos + 1], many.answer_pos[rows],
                       many.answers[rows])


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
    p.add_argument("--kl-threshold", default="5e-2", help="ACDC threshold on KL, as auto-circuit's base e exponent")
    p.add_argument("--auto-circuit", metavar="PATH", help="where auto-circuit 1.0.1 is installed (pip --target)")
    args = p.parse_args()
    why_not = load(args.auto_circuit) if args.auto_circuit else "no --auto-circuit PATH given"
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
        if why_not:
            print(f"  auto-circuit 1.0.1: not run ({why_not})")
        else:
            beside_auto_circuit(model, pairs, runner, args, repeats)


def beside_auto_circuit(model, pairs, runner, args, repeats: int) -> None:
    """auto-circuit's EAP (mask gradient at 0), integrated gradients (5) and ACDC (KL, one threshold) against
    ours on the same model and pairs."""
    g = runner.graph
    order = [(g.sources[s], g.dests[d]) for d in reversed(range(len(g.dests)))
             for s in reversed(range(len(g.sources))) if g.allowed[s, d]]
    ac = AutoCircuit(model, pairs, order)
    t_ac, ps = timed(ac.eap, repeats)
    t_ours, ours = timed(lambda: methods.eap(runner), repeats)
    theirs = ac.scores(ps)  # d loss / d mask with loss = -logit diff: our sign flipped
    diff = max(abs(v + float(ours[g.index(*k)])) for k, v in theirs.items())
    print(f"  EAP        auto-circuit {t_ac:.3f} s   toylens {t_ours:.3f} s   ratio {t_ac / t_ours:5.1f}x   "
          f"max |diff| {diff:.2e}")
    t_ac, _ = timed(lambda: ac.integrated_gradients(5), repeats)
    t_ours, _ = timed(lambda: methods.eap_ig(runner, 5), repeats)
    print(f"  IG(5)      auto-circuit {t_ac:.3f} s (mask IG)   toylens EAP-IG {t_ours:.3f} s   "
          f"ratio {t_ac / t_ours:5.1f}x")
    base, exp = (int(x) for x in args.kl_threshold.lower().split("e"))
    kl_runner = EdgeRunner(model, pairs, metric="kl")
    t_ac, kept_ac = timed(lambda: ac.acdc_kept(base, exp), repeats)
    t_ours, (kept, _) = timed(lambda: methods.acdc(kl_runner, base * 10.0 ** exp), repeats)
    mine = {(g.sources[s], g.dests[d]) for s, d in kept.nonzero().tolist()}
    print(f"  ACDC (KL {args.kl_threshold})  auto-circuit {t_ac:.3f} s   toylens {t_ours:.3f} s   "
          f"ratio {t_ac / t_ours:5.1f}x   same circuit: {mine == kept_ac} ({len(mine)} edges)")


if __name__ == "__main__":
    main()
