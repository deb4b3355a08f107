"""Circuit discovery on tracr programs: ROC AUC of each method's edge scores against the edges tracr built (read off
its craft model: ``toylens.analyze.discovery.tracr_truth.true_edges``), with edges, pairs and time per method.

Each program from ``tracr.compiler.lib`` is compiled, converted to a HookedTransformer (checked against tracr's own
forward: residual stream after every block, and the decoded outputs), and run on clean/corrupted input pairs (one
token changed, or the input one token longer or shorter), answered at the first position whose output changes;
metric logit_diff (clean answer's score minus the corrupted answer's: +1 clean, -1 corrupted). AUC counts ties
half; "AUC (1e-6)" first sets |score| <= 1e-6 * max to 0, so that numerical dust does not count as a ranking.

    python benchmarks/tracr_auc.py                         # reverse hist sort_unique sort shuffle_dyck
    python benchmarks/tracr_auc.py reverse sort --n 64     # some programs, fewer input pairs
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from toylens.analyze.discovery import EdgeRunner, discover
from toylens.analyze.discovery.tracr_truth import EXAMPLES, pairs_from_inputs, roc_auc, true_edges

METHODS = ("exact", "acdc", "eap", "eap_ig")


def check_conversion(prog, name: str, n: int = 6) -> tuple[float, bool]:
    """Max |residual difference| to tracr's forward over every block, and decoded outputs equal at non-PAD positions
    (at PAD positions tracr's output is an argmax over near-ties, which float rounding may break either way)."""
    model = prog.model(torch.float32)
    inputs = EXAMPLES[name].inputs(n, seed=7)[0]
    with torch.no_grad():
        logits, cache = model.run_with_cache(prog.encode(inputs))
    ours, worst, same = prog.decode(logits), 0.0, True
    for i, x in enumerate(inputs):
        out = prog.assembled.apply([prog.bos, *x] + [prog.pad] * (prog.max_seq_len - len(x)))
        mine = [cache[h, layer][i].numpy() for layer in range(model.cfg.n_layers) for h in ("resid_mid", "resid_post")]
        worst = max([worst] + [float(np.abs(a - np.asarray(b[0])).max()) for a, b in zip(mine, out.residuals,
                                                                                          strict=True)])
        same &= ours[i][:len(x) + 1] == out.decoded[:len(x) + 1]
    return worst, same


def run(name: str, n: int, ig_steps: int) -> dict:
    ex = EXAMPLES[name]
    t0 = time.perf_counter()
    prog = ex.compile()
    compile_s = time.perf_counter() - t0
    diff, same = check_conversion(prog, name)
    model = prog.model(torch.float64)
    truth, structural = true_edges(prog), true_edges(prog, input_dependent=False)
    clean, corrupted = ex.inputs(n, seed=0)
    pairs = pairs_from_inputs(prog, model, clean, corrupted)
    runner = EdgeRunner(model, pairs, "logit_diff")
    c = model.cfg
    row = {"program": name, "shape": f"{c.n_layers}L x {c.n_heads}H, d_model {c.d_model}, d_mlp {c.d_mlp}",
           "edges": runner.graph.n_edges, "true": len(truth), "structural": len(structural), "pairs": pairs.batch_size,
           "compile_s": compile_s, "resid_diff": diff, "decoded_equal": same}
    for method in METHODS:
        kwargs = {"threshold": 1e-6} if method == "acdc" else {"top_n": len(truth)}
        t0 = time.perf_counter()
        result = discover(model, pairs, method=method, runner=runner, ig_steps=ig_steps, **kwargs)
        row[method] = {"auc": roc_auc(result.edges, truth), "auc_tol": roc_auc(result.edges, truth, 1e-6),
                       "auc_structural": roc_auc(result.edges, structural), "s": time.perf_counter() - t0,
                       "circuit_is_truth": set(result.circuit) == truth}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("programs", nargs="*", help=f"any of {list(EXAMPLES)} (default: all)")
    ap.add_argument("--n", type=int, default=128, help="input pairs drawn (those whose output does not change drop)")
    ap.add_argument("--ig-steps", type=int, default=5)
    args = ap.parse_args()
    unknown = [p for p in args.programs if p not in EXAMPLES]
    if unknown:
        ap.error(f"unknown programs {unknown}; choose from {list(EXAMPLES)}")
    torch.set_num_threads(1)
    rows = [run(p, args.n, args.ig_steps) for p in args.programs or EXAMPLES]
    print("| program | model | edges | true (structural) | pairs | exact AUC | ACDC AUC | EAP AUC (1e-6) "
          "| EAP-IG AUC (1e-6) | time exact / ACDC / EAP / EAP-IG |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = " / ".join(f"{r[m]['s']:.2f}" for m in METHODS)
        print(f"| {r['program']} | {r['shape']} | {r['edges']} | {r['true']} ({r['structural']}) | {r['pairs']} "
              f"| {r['exact']['auc']:.3f} | {r['acdc']['auc']:.3f} | {r['eap']['auc']:.3f} ({r['eap']['auc_tol']:.3f}) "
              f"| {r['eap_ig']['auc']:.3f} ({r['eap_ig']['auc_tol']:.3f}) | {t} s |")
    print()
    for r in rows:
        print(f"{r['program']}: compiled in {r['compile_s']:.1f} s; converted model vs tracr: max |residual diff| "
              f"{r['resid_diff']:.1e}, decoded outputs equal: {r['decoded_equal']}; AUC against every structural edge "
              "(constant ones included): " + ", ".join(f"{m} {r[m]['auc_structural']:.3f}" for m in METHODS)
              + "; circuit = true edges: " + ", ".join(f"{m} {r[m]['circuit_is_truth']}" for m in METHODS))


if __name__ == "__main__":
    main()
