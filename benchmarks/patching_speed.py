"""Activation patching sweeps: toylens's engine against ``transformer_lens.patching``, same process.

Two settings, random weights (timing does not depend on training):

* seed: seed 004's model (2 layers, d_model 64, one 64-dim head, d_mlp 256, d_vocab 300, relu, LN,
  no positional embedding) on the prev_token task at seq len 50, batch 32: clean prompts from
  ``task.sample``, corrupted from ``task.corrupt`` (fresh tokens after BOS), the answer at the last
  position.
* gpt2: a GPT-2-shaped model built in-process (12 layers, d_model 768, 12 heads, d_mlp 3072,
  gelu_new, LN, standard positions) with d_vocab 1000, batch 4 x 12 tokens, prompts that differ
  from position 1 on and answers at the last position (the worst case for the engine: no shared
  prefix, nothing after the answer).
* gpt2-ioi: the same model, batch 4 x 15 tokens, corrupted prompts that differ in one token
  (position 10, as an IOI name swap), answers at the last position.

On the gpt2 settings TransformerLens needs one full forward per patch, so the sweeps with more
than ``--max-tl`` patches are timed on a random subset of ``--max-tl`` patches
(``generic_activation_patch`` with an ``index_df``) and the time is scaled to the whole sweep; the
difference is checked on the subset.

Answers (``model_answers``): per prompt the tokens whose logit the corruption lowers and raises
most, so that the normalised metric is well conditioned on random weights.
For each sweep: TL seconds (a user's whole computation: ``run_with_cache`` on the clean prompts,
the corrupted forward for the baseline, then TL's sweep function with the normalised logit-diff
metric; the best of two runs on the seed setting, one on the gpt2 ones), toylens seconds
(``patch(model, pairs, kind)`` from scratch: the best of three calls), the
ratio, the largest difference of the normalised values, and PASS/FAIL (>= 10x and <= 1e-5). Then
attribution patching: its time and its correlation with the exact sweeps. Wall times are noisy on
a shared machine; process CPU times are printed beside them.

    python benchmarks/patching_speed.py            # all settings (tens of minutes on 2 cores)
    python benchmarks/patching_speed.py --setting seed --threads 1
    python benchmarks/patching_speed.py --quick    # fewer sweeps, smaller TL subsets
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # TL's sweeps draw a progress bar per call

import pandas as pd
import torch
import transformer_lens.patching as tlp

from toylens._compat import HookedTransformerConfig
from toylens.analyze.attribution_patching import attribution_patch, correlation
from toylens.analyze.metrics import tl_metric
from toylens.analyze.pairs import PromptPairs
from toylens.analyze.patching import EVERY, KINDS, TL_EVERY, patch
from toylens.data import TASKS, make_task
from toylens.model.build import make_model

TARGET_SPEEDUP, TARGET_TOL = 10.0, 1e-5
ALL = [*KINDS, *EVERY]
QUICK = ["resid_pre", "attn_out", "z_all_pos", "z_by_pos", "k_by_pos", "pattern_by_pos", "block_every",
         "attn_head_all_pos_every"]


def model_answers(model, clean, corrupted, answer_pos):
    """``[batch, 2, 1]``: per prompt, the tokens whose logit the corruption lowers most (correct) and
    raises most (incorrect) at the answer position. On random weights this keeps the normalised
    metric well conditioned: its denominator, the clean-corrupted gap, is as large as it gets (the
    task's own answers give a gap near zero, which would divide every value)."""
    rows = torch.arange(len(clean))
    with torch.no_grad():
        change = model(clean)[rows, answer_pos] - model(corrupted)[rows, answer_pos]
    return torch.stack([change.argmax(-1), change.argmin(-1)], 1)[:, :, None]


def seed_setting(batch: int = 32):
    cfg = HookedTransformerConfig(n_layers=2, d_model=64, d_head=64, n_heads=1, d_mlp=256, d_vocab=300,
                                  n_ctx=50, act_fn="relu", normalization_type="LN", seed=0)
    model = make_model(cfg, positional_embedding_type="none").eval()
    task = make_task(TASKS["prev_token"].config_cls(d_vocab=300, seq_len=50))
    g = torch.Generator().manual_seed(1)
    clean = task.sample(batch, g)
    corrupted = task.corrupt(clean, g)
    pos = torch.full((batch,), clean.tokens.shape[1] - 1)
    answers = model_answers(model, clean.tokens, corrupted.tokens, pos)
    return model, PromptPairs(clean.tokens, corrupted.tokens, pos, answers)


def gpt2_setting(batch: int = 4, n_pos: int = 12):
    cfg = HookedTransformerConfig(n_layers=12, d_model=768, d_head=64, n_heads=12, d_mlp=3072, d_vocab=1000,
                                  n_ctx=64, act_fn="gelu_new", normalization_type="LN", seed=0)
    model = make_model(cfg).eval()
    g = torch.Generator().manual_seed(2)
    clean = torch.randint(1, 1000, (batch, n_pos), generator=g)
    clean[:, 0] = 0
    corrupted = clean.clone()
    corrupted[:, 1:] = torch.randint(1, 1000, (batch, n_pos - 1), generator=g)
    pos = torch.full((batch,), n_pos - 1)
    return model, PromptPairs(clean, corrupted, pos, model_answers(model, clean, corrupted, pos))


def gpt2_ioi_setting(batch: int = 4, n_pos: int = 15, swap: int = 10):
    """IOI-style pairs on the GPT-2-shaped model: the corrupted prompt differs in one token (a name at
    position ``swap``), the answer is read at the last position."""
    model, _ = gpt2_setting(1, 2)
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(1, 1000, (batch, n_pos), generator=g)
    clean[:, 0] = 0
    corrupted = clean.clone()
    corrupted[:, swap] = (clean[:, swap] + torch.randint(1, 999, (batch,), generator=g)) % 1000
    pos = torch.full((batch,), n_pos - 1)
    return model, PromptPairs(clean, corrupted, pos, model_answers(model, clean, corrupted, pos))


def _tl_parts(kind: str) -> list[tuple[str, str]]:
    """(toylens kind, TL activation name) of each TL sweep inside ``kind``."""
    return [(k, KINDS[k].act) for k in EVERY.get(kind, (kind,))]


def _setter(kind: str):
    """TransformerLens's patch setter of ``kind`` (as in its ``get_act_patch_*`` functions)."""
    spec = KINDS[kind]
    if spec.axes == ("layer", "pos"):
        return tlp.layer_pos_patch_setter
    if spec.act != "pattern":
        return tlp.layer_head_vector_patch_setter if spec.all_pos else tlp.layer_pos_head_vector_patch_setter
    return {"pattern_all_pos": tlp.layer_head_pattern_patch_setter,
            "pattern_by_pos": tlp.layer_head_pos_pattern_patch_setter,
            "pattern_dest_src": tlp.layer_head_dest_src_pos_pattern_patch_setter}[kind]



_TL_AXES = {("layer", "head_index"): ("layer", "head"), ("layer", "pos", "head_index"): ("layer", "pos", "head")}


def run_tl(model, pairs, kind: str, max_patches: int | None, rng: torch.Generator):
    """TL's whole computation for ``kind``: (seconds, cpu seconds, values, index or None, scale)."""
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(pairs.clean)
        corrupted_logits = model(pairs.corrupted)
        raw = tl_metric("logit_diff", pairs)
        metric = tl_metric("logit_diff", pairs, raw(clean_logits).item(), raw(corrupted_logits).item())
        setup_wall, setup_cpu = time.perf_counter() - t0, time.process_time() - c0
        n_total = sum(_n_patches(model, pairs, k) for k, _ in _tl_parts(kind))
        if max_patches is None or n_total <= max_patches:
            if kind in TL_EVERY:
                values = getattr(tlp, TL_EVERY[kind])(model, pairs.corrupted, cache, metric)
            elif KINDS[kind].tl_function:
                values = getattr(tlp, KINDS[kind].tl_function)(model, pairs.corrupted, cache, metric)
            else:  # resid_post: TL's generic function with its layer-pos setter
                values = tlp.generic_activation_patch(model, pairs.corrupted, cache, metric,
                                                      tlp.layer_pos_patch_setter, "resid_post", ("layer", "pos"))
            return time.perf_counter() - t0, time.process_time() - c0, values, None, 1.0
        # a random subset of each part's patches, timed and scaled up to the whole sweep
        subsets = []
        per_part = max(1, max_patches // len(_tl_parts(kind)))
        for k, act in _tl_parts(kind):
            spec = KINDS[k]
            shape = _shape(model, pairs, k)
            flat = torch.randperm(int(torch.tensor(shape).prod()), generator=rng)[:per_part].sort().values
            idx = torch.stack(torch.unravel_index(flat, shape), 1)
            df = pd.DataFrame(idx.numpy(), columns=list(_TL_AXES.get(spec.axes, spec.axes)))
            out = tlp.generic_activation_patch(model, pairs.corrupted, cache, metric, _setter(k), act,
                                               index_df=df)
            subsets.append((k, idx, out))
    wall, cpu = time.perf_counter() - t0 - setup_wall, time.process_time() - c0 - setup_cpu
    done = sum(len(i) for _, i, _ in subsets)
    scale = n_total / done
    return setup_wall + wall * scale, setup_cpu + cpu * scale, None, subsets, scale


def _shape(model, pairs, kind):
    from toylens.analyze.patching.engine import n_heads_for

    sizes = {"layer": model.cfg.n_layers, "pos": pairs.n_pos, "dest_pos": pairs.n_pos, "src_pos": pairs.n_pos,
             "head_index": n_heads_for(model, KINDS[kind].act)}
    return tuple(sizes[a] for a in KINDS[kind].axes)


def _n_patches(model, pairs, kind):
    return int(torch.tensor(_shape(model, pairs, kind)).prod())


def work_ratio(model, pairs, kind: str) -> float:
    """TransformerLens's work over the engine's, counted in block-positions (one block on one position
    of one prompt): the speed-up an engine would reach if each block-position cost what it costs in
    TL. TL runs two forwards (clean with cache, corrupted) and one full forward per patch; the engine
    runs the clean and corrupted prompts once up to the last answer position, then each active item
    from its layer and first changed position (one position in the patched layer for local kinds, and
    the last block at the answer position only). Where this is below the 10x target, meeting it needs
    a block-position cheaper than TL's (bigger batches, fused kernels), not less work."""
    from toylens.analyze.metrics import get_metric
    from toylens.analyze.patching.engine import Context, enumerate_patches, plan_items

    ctx = Context(model, pairs, get_metric("logit_diff"))
    n_layers, b = model.cfg.n_layers, pairs.batch_size
    tl, ours = 2 * b * pairs.n_pos * n_layers, 2 * b * ctx.T * n_layers
    for part in EVERY.get(kind, (kind,)):
        spec = KINDS[part]
        patches = enumerate_patches(ctx, spec)
        tl += len(patches.layer) * b * pairs.n_pos * n_layers
        item_patch, _, p0 = plan_items(ctx, patches)
        layer, width = patches.layer[item_patch], ctx.T - p0
        last = layer == n_layers - 1
        patched = torch.where(last, 1, 1 if spec.local else width)
        ours += int((patched + (n_layers - 2 - layer).clamp_min(0) * width + (~last).long()).sum())
    return tl / ours


def max_diff(ours, kind, tl_values, subsets) -> float:
    if subsets is None:
        return (ours.values - tl_values.cpu()).abs().max().item()
    worst = 0.0
    for k, idx, out in subsets:
        mine = ours.sub(k).values if kind in EVERY else ours.values
        got = mine[tuple(idx.T)]
        worst = max(worst, (got - out.cpu()).abs().max().item())
    return worst


def bench(name: str, model, pairs, kinds, max_tl: int | None, attribution_kinds, repeat: int = 3,
          tl_repeat: int = 1) -> bool:
    """Every sweep of ``kinds``: the best of ``tl_repeat`` TL runs against the best of ``repeat`` of ours."""
    print(f"\n=== {name}: {model.cfg.n_layers} layers x d_model {model.cfg.d_model}, {model.cfg.n_heads} heads, "
          f"d_vocab {model.cfg.d_vocab}; batch {pairs.batch_size} x {pairs.n_pos} tokens; "
          f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}", flush=True)
    patch(model, pairs, "z_all_pos", progress=False)  # warm-up (lazy init), not timed
    rng = torch.Generator().manual_seed(0)
    ok = True
    exact = {}
    print(f"{'sweep':<26}{'TL s':>9}{'(cpu)':>8}{'ours s':>9}{'(cpu)':>8}{'ratio':>8}{'(cpu)':>7}{'work':>7}  "
          f"{'max|diff|':>9}  verdict", flush=True)
    for kind in kinds:
        tl_runs = []
        for _ in range(tl_repeat):
            seed = int(torch.randint(1 << 30, (1,), generator=rng))
            tl_runs.append(run_tl(model, pairs, kind, max_tl, torch.Generator().manual_seed(seed)))
        tl_wall, tl_cpu, tl_values, subsets, scale = min(tl_runs, key=lambda r: r[0])
        runs = []
        for _ in range(repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            result = patch(model, pairs, kind, progress=False)
            runs.append((time.perf_counter() - t0, time.process_time() - c0))
        wall, cpu = min(r[0] for r in runs), min(r[1] for r in runs)
        exact[kind] = result
        err = max_diff(result, kind, tl_values, subsets)
        ratio, cpu_ratio = tl_wall / wall, tl_cpu / cpu
        passed = ratio >= TARGET_SPEEDUP and err <= TARGET_TOL
        ok &= passed
        note = "" if subsets is None else f"  (TL timed on 1/{scale:.0f} of the patches)"
        work = work_ratio(model, pairs, kind)
        print(f"{kind:<26}{tl_wall:9.3f}{tl_cpu:8.2f}{wall:9.3f}{cpu:8.3f}{ratio:7.1f}x{cpu_ratio:6.1f}x{work:6.1f}x  "
              f"{err:9.2e}  {'PASS' if passed else 'FAIL'}{note}", flush=True)
    t0 = time.perf_counter()
    est = attribution_patch(model, pairs, attribution_kinds)
    t_attr = time.perf_counter() - t0
    print(f"attribution patching ({len(est.results)} sweeps) {t_attr:.3f} s; correlation with exact patching:")
    for kind, r in est.results.items():
        ex = exact.get(kind) or patch(model, pairs, kind, progress=False)
        print(f"  {kind:<26} r = {correlation(r, ex):+.3f}")
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer sweeps, smaller TL subsets on the gpt2 setting")
    p.add_argument("--setting", choices=["seed", "gpt2", "gpt2-ioi", "all"], default="all")
    p.add_argument("--max-tl", type=int, default=None,
                   help="largest number of patches TL runs on the gpt2 setting (default 150; --quick 24)")
    p.add_argument("--kinds", default=None, help="comma-separated sweeps (default: all; --quick: a subset)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kinds = args.kinds.split(",") if args.kinds else (QUICK if args.quick else ALL)
    max_tl = args.max_tl or (24 if args.quick else 150)
    attr = ["resid_pre", "attn_out", "mlp_out", "z_all_pos", "v_all_pos", "pattern_all_pos", "z_by_pos"]
    verdicts = {}
    if args.setting in ("seed", "all"):
        verdicts["seed"] = bench("seed", *seed_setting(), kinds, None, attr, tl_repeat=2)
    if args.setting in ("gpt2", "all"):
        verdicts["gpt2"] = bench("gpt2", *gpt2_setting(), kinds, max_tl, attr)
    if args.setting in ("gpt2-ioi", "all"):
        verdicts["gpt2-ioi"] = bench("gpt2-ioi", *gpt2_ioi_setting(), kinds, max_tl, attr)
    summary = ", ".join(f"{k}: {'PASS' if v else 'FAIL'}" for k, v in verdicts.items())
    print(f"\n{'PASS' if all(verdicts.values()) else 'FAIL'} ({summary}; targets: >= {TARGET_SPEEDUP:g}x wall "
          f"on every sweep, max |diff| <= {TARGET_TOL:g})")


if __name__ == "__main__":
    main()
