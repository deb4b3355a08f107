"""The GPU check's measurements, in one process (benchmarks/gpu_check.sh runs it; see benchmarks/README.md).

    python benchmarks/gpu_bench.py --json gpu.json     # on a CUDA GPU
    python benchmarks/gpu_bench.py --dry-run           # every code path, tiny sizes, on the CPU

(a) training ms/step: toylens's step (the fused forward, ``pick_forward(model, "auto")``) against HookedTransformer
eager (``"off"``), fp32 and bf16 autocast, for the seed model (experiment=no_pos_prev_token) and a 4-layer d_model
256 model, at batch 256 and 1024; tokens/s and the achieved fraction of the GPU's bf16 dense peak;
(b) ``experiment=grokking`` trained on the GPU to held-out accuracy 0.99: wall and step;
(c) every-hook mean ablation and activation patching against TransformerLens's own way (the reference loops of
benchmarks/ablation_speed.py and benchmarks/patching_speed.py) as ratios;
(d) peak GPU memory (``torch.cuda.max_memory_allocated``) of each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other benchmark scripts' helpers

# bf16 dense peak FLOP/s by device name (vendor data sheets; T4 has no bf16: its fp16 peak)
PEAKS = {"H100 SXM": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
         "A10G": 125e12, "RTX 4090": 165e12, "T4": 65e12}


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAKS.items() if k in name), None)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_flops(cfg, batch: int, seq: int, d_vocab: int) -> float:
    """Training FLOPs of one step: 6 x (matmul parameters) x tokens (forward 2, backward 4) plus attention's
    scores and weighted sum, 12 x n_layers x seq^2 x (n_heads x d_head) x batch (QK^T and AV, forward + backward)."""
    m = cfg.model
    mlp = 0 if m.attn_only else 2 * m.d_model * (m.d_mlp or 0)
    params = m.n_layers * (4 * m.d_model * m.n_heads * m.d_head + mlp) + m.d_model * d_vocab
    return 6.0 * params * batch * seq + 12.0 * m.n_layers * seq * seq * m.n_heads * m.d_head * batch


def train_step_ms(device: str, model_overrides: list[str], batch: int, precision: str, mode: str, steps: int,
                  warmup: int) -> dict:
    from train_speed import experiment_config

    from toylens.data import make_task
    from toylens.model.build import build_model
    from toylens.train.loop import make_train_step, pick_forward
    from toylens.train.optim import make_optimizer

    cfg = experiment_config(batch, [*model_overrides, f"train.precision={precision}"])
    task = make_task(cfg.task)
    model = build_model(cfg.model, task.d_vocab, task.seq_len, cfg.seed, device)
    opt, sched = make_optimizer(model, cfg.optim, cfg.train.steps)
    step = make_train_step(model, pick_forward(model, mode), opt, sched, task,
                           torch.Generator(device=device).manual_seed(0), cfg)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    ms = 1000 * statistics.median(times)
    flops = step_flops(cfg, batch, task.seq_len, task.d_vocab)
    return {"ms_per_step": ms, "tokens_per_s": batch * task.seq_len / (ms / 1000), "flop_per_s": flops / (ms / 1000),
            "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None}


def grokking(device: str, max_steps: int) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from toylens._paths import config_dir
    from toylens.runs.config import register_configs
    from toylens.train.loop import train

    register_configs()
    with tempfile.TemporaryDirectory() as tmp:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = OmegaConf.to_object(compose(config_name="train", overrides=[
                "experiment=grokking", f"device={device}", "train.stop_at_accuracy=0.99",
                "train.stop_at_eval_loss=null", f"train.steps={max_steps}", "train.progress=false",
                f"checkpoint_root={tmp}"]))
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        res = train(cfg)
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "step": res.step, "eval_accuracy": res.eval_accuracy, "capped": not res.stopped_early,
            "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None}


def timed(fn, device: str) -> tuple[float, float | None]:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0, (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None)


def interventions(device: str, n: int) -> dict:
    import ablation_speed as ab
    import patching_speed as pt

    from toylens.analyze.patching import patch

    model = ab.seed_model(0).to(device)
    task_batch, reference = [b.to(device) for b in ab.setup(n, 0)[1:]]
    ab.ours(model, task_batch[:8], reference[:8])  # warm-up
    t_tl, m_tl = timed(lambda: ab.naive_loop(model, task_batch, reference, grad=False), device)
    t_ours, m_ours = timed(lambda: ab.ours(model, task_batch, reference), device)
    out = {"ablation": {"tl_s": t_tl, "toylens_s": t_ours, "ratio": t_tl / t_ours, "tl_peak_mem_mb": m_tl,
                        "toylens_peak_mem_mb": m_ours, "rows": n}}
    pmodel, pairs = pt.seed_setting(min(n, 32))
    pmodel = pmodel.to(device)
    pairs = type(pairs)(pairs.clean.to(device), pairs.corrupted.to(device), pairs.answer_pos.to(device),
                        pairs.answers.to(device))
    patch(pmodel, pairs, "z_all_pos", progress=False)  # warm-up
    for kind in ("resid_pre", "z_all_pos"):
        t_tl, m_tl = timed(lambda kind=kind: pt.run_tl(pmodel, pairs, kind, None, torch.Generator().manual_seed(0)),
                           device)
        t_ours, m_ours = timed(lambda kind=kind: patch(pmodel, pairs, kind, progress=False), device)
        out[f"patching/{kind}"] = {"tl_s": t_tl, "toylens_s": t_ours, "ratio": t_tl / t_ours, "tl_peak_mem_mb": m_tl,
                                   "toylens_peak_mem_mb": m_ours}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes, 1-2 steps, on the CPU: the code paths only")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    ap.add_argument("--grok-steps", type=int, default=3000, help="cap of the grokking run (it stops at 0.99)")
    args = ap.parse_args()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_bench: error: CUDA is not available here; run it on a GPU machine, or --dry-run on a CPU",
              file=sys.stderr)
        sys.exit(2)
    device = "cpu" if dry else "cuda"
    name = "CPU (dry run)" if dry else torch.cuda.get_device_name(0)
    peak = None if dry else peak_flops(name)
    print(f"gpu_bench on {name}{'' if peak else ' (bf16 peak unknown)'}; torch {torch.__version__}", flush=True)
    results: dict = {"device": name, "dry_run": dry, "peak_bf16_flop_per_s": peak, "train": {}}
    models = {"seed (2 layers, d_model 64)": [],
              "4 layers, d_model 256": ["model.n_layers=4", "model.d_model=256", "model.n_heads=4", "model.d_head=64",
                                        "model.d_mlp=1024"]}
    if dry:  # the code paths only: the big model's shape at a quarter of its width (bf16 is emulated on a CPU)
        models["4 layers, d_model 256"] = ["model.n_layers=4", "model.d_model=64", "model.n_heads=4",
                                           "model.d_head=16", "model.d_mlp=256"]
    batches = (8,) if dry else (256, 1024)
    steps, warmup = (2, 1) if dry else (30, 5)
    print(f"{'model':<30}{'batch':>6}{'prec':>6}{'forward':>9}{'ms/step':>10}{'tok/s':>12}{'% peak':>8}"
          f"{'mem MB':>9}", flush=True)
    for label, over in models.items():
        for batch in batches:
            for precision in ("fp32", "bf16"):
                for mode, who in (("auto", "toylens"), ("off", "HT eager")):
                    r = train_step_ms(device, over, batch, precision, mode, steps, warmup)
                    results["train"][f"{label}|{batch}|{precision}|{who}"] = r
                    frac = f"{100 * r['flop_per_s'] / peak:7.1f}%" if peak else "      –"
                    mem = f"{r['peak_mem_mb']:9.0f}" if r["peak_mem_mb"] is not None else "        –"
                    print(f"{label:<30}{batch:>6}{precision:>6}{who:>9}{r['ms_per_step']:10.2f}"
                          f"{r['tokens_per_s']:12.0f}{frac}{mem}", flush=True)
    g = grokking(device, 3 if dry else args.grok_steps)
    results["grokking"] = g
    print(f"grokking to held-out accuracy 0.99: {g['wall_s']:.1f} s, step {g['step']}, accuracy "
          f"{g['eval_accuracy']:.3f}{' (CAPPED: did not reach 0.99)' if g['capped'] else ''}", flush=True)
    iv = interventions(device, 16 if dry else 2000)
    results["interventions"] = iv
    for k, v in iv.items():
        print(f"{k:<24} TransformerLens {v['tl_s']:.3f} s, toylens {v['toylens_s']:.3f} s, ratio {v['ratio']:.1f}x"
              + (f"; peak MB {v['tl_peak_mem_mb']:.0f} vs {v['toylens_peak_mem_mb']:.0f}"
                 if v["tl_peak_mem_mb"] is not None else ""), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"numbers: {args.json}")
    print("dry run: every measurement ran" if dry else "done")


if __name__ == "__main__":
    main()
