"""The training loop: a flat, readable function in the nanoGPT spirit. ``train(cfg)`` is what the
CLI calls and what tests call directly."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from toylens.data import Batch, Task, make_task
from toylens.model import fused as fast_forward
from toylens.model.build import build_model, model_config_dict
from toylens.runs import checkpoint as ck
from toylens.runs.config import ConfigError, TrainConfig, resolve_device, validate
from toylens.runs.loggers import JsonlLogger, Loggers, WandbLogger
from toylens.train.optim import make_optimizer


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    eval_loss: float | None
    eval_accuracy: float | None
    stopped_early: bool


def new_run_dir(cfg: TrainConfig) -> Path:
    """``<checkpoint_root>/<name>/<YYYY-mm-dd_HH-MM-SS>`` (Python API; the CLI gets it from Hydra)."""
    base = Path(cfg.checkpoint_root).expanduser().resolve() / cfg.name / time.strftime("%Y-%m-%d_%H-%M-%S")
    run_dir, i = base, 1
    while run_dir.exists():
        run_dir, i = base.with_name(f"{base.name}_{i}"), i + 1
    return run_dir


def _check_fresh(run_dir: Path) -> None:
    if (run_dir / "metrics.jsonl").exists() or ck.list_checkpoints(run_dir):
        raise ConfigError(f"run directory {run_dir} already holds a run; continue it with resume={run_dir} "
                          f"or choose another hydra.run.dir")


def pick_forward(model, mode: str):
    """The fused forward (``fast_forward``) when it computes this model exactly, else the model's own."""
    why = fast_forward.supports(model)
    if mode == "on" and why:
        raise ConfigError(f"train.fast_forward=on but the fused forward does not cover {why}; use auto or off")
    if mode == "off" or why:
        return model
    return lambda tokens: fast_forward.forward(model, tokens)


def make_train_step(model, forward, opt, sched, task: Task, gen: torch.Generator, cfg: TrainConfig):
    """One optimisation step as a closure returning ``(loss, lr)``; the loss stays on the device
    (no host sync). The loop and ``benchmarks/train_speed.py`` both time exactly this."""
    t, o = cfg.train, cfg.optim
    device = gen.device.type
    trainable = [p for p in model.parameters() if p.requires_grad]
    fwd = torch.compile(forward) if t.compile else forward

    def step() -> tuple[torch.Tensor, float]:
        batch = task.sample(t.batch_size, gen)
        targets = batch.targets.masked_fill(~batch.loss_mask, -100)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=t.precision == "bf16"):
            logits = fwd(batch.tokens)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss.backward()
        if o.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(trainable, o.grad_clip)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        return loss.detach(), lr

    return step


@torch.no_grad()
def evaluate(forward, task: Task, batch: Batch, chunk_rows: int = 512) -> tuple[float, float]:
    """Masked cross-entropy and the task's accuracy on ``batch``, in fp32, in chunks of rows."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=batch.tokens.device)
    acc_sum = torch.zeros((), dtype=torch.float64, device=batch.tokens.device)
    n_tok = batch.loss_mask.sum()
    for i in range(0, len(batch), chunk_rows):
        part = batch[i : i + chunk_rows]
        logits = forward(part.tokens).float()
        tgt = part.targets.masked_fill(~part.loss_mask, -100)
        loss_sum += F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100, reduction="sum")
        acc_sum += task.accuracy(logits, part).double() * len(part)
    return (loss_sum / n_tok).item(), (acc_sum / len(batch)).item()


def train(cfg: TrainConfig, run_dir: Path | None = None, explicit: list[str] | None = None,
          overrides: list[str] | None = None) -> TrainResult:
    """Train ``cfg`` into ``run_dir`` (or continue ``cfg.resume``); returns where and how it ended.

    Everything that can be checked is checked before the first byte is written. ``overrides`` (the
    CLI's Hydra overrides) are saved to ``.hydra/overrides.yaml`` as Hydra itself would.
    """
    if cfg.resume:
        from toylens.train.resume import reconcile

        cfg = reconcile(cfg, explicit)
        run_dir = Path(cfg.resume)
    validate(cfg)
    device = resolve_device(cfg.device)
    run_dir = Path(run_dir).resolve() if run_dir is not None else new_run_dir(cfg)
    if not cfg.resume:
        _check_fresh(run_dir)

    task = make_task(cfg.task)
    model = build_model(cfg.model, task.d_vocab, task.seq_len, cfg.seed, device)
    t, o = cfg.train, cfg.optim
    opt, sched = make_optimizer(model, o, t.steps)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    eval_batch = task.eval_set(t.eval_size, t.eval_seed, device)

    forward = pick_forward(model, t.fast_forward)
    train_step = make_train_step(model, forward, opt, sched, task, gen, cfg)

    start, acc = 0, {"loss_sum": 0.0, "count": 0}
    wandb_id = None
    if cfg.resume:
        start = ck.list_checkpoints(run_dir)[-1]
        model.load_state_dict(ck.load_weights(run_dir, start, device))
        state = ck.load_state(run_dir, start)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        ck.set_rng_state(state["rng"], gen)
        acc, wandb_id = state.get("log_accumulator", acc), state.get("wandb_id")
        ck.truncate_metrics(run_dir, start)
        if start >= t.steps:
            print(f"toylens: {run_dir} is already at step {start} >= train.steps={t.steps}; "
                  f"pass a larger train.steps to continue", file=sys.stderr)
            return TrainResult(run_dir, start, None, None, False)
    else:
        resolved = OmegaConf.to_yaml(OmegaConf.structured(cfg))
        ck.write_text(run_dir / ".hydra" / "config.yaml", resolved)
        if overrides is not None:
            ck.write_text(run_dir / ".hydra" / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
        ck.write_json(run_dir / "model_config.json", model_config_dict(model))

    sinks: list = [JsonlLogger(run_dir)]
    if cfg.logger.name == "wandb":
        sinks.append(WandbLogger(cfg.logger, run_dir, cfg.to_dict(), resume_id=wandb_id))
    log = Loggers(sinks)

    def save(step: int) -> Path:
        state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": ck.rng_state(gen),
                 "log_accumulator": dict(acc), "wandb_id": log.wandb_id}
        path = ck.save_checkpoint(run_dir, step, model, state)
        ck.prune_checkpoints(run_dir, t.keep_last)
        return path

    loss_sum = torch.zeros((), device=device)  # summed on device: no host sync per step
    count = 0
    eval_loss = eval_acc = None
    stopped_early = False
    step = start
    bar = tqdm(total=t.steps, initial=start, disable=not t.progress, desc=cfg.name, dynamic_ncols=True,
               mininterval=0.5, file=sys.stderr)
    try:
        for step in range(start + 1, t.steps + 1):
            loss, lr = train_step()
            loss_sum += loss
            count += 1

            row: dict = {}
            if step % t.log_every == 0 or step == t.steps:
                total = loss_sum.item() + acc["loss_sum"]
                n = count + acc["count"]
                mean = total / n
                if not math.isfinite(mean):
                    last = ck.list_checkpoints(run_dir)
                    raise TrainingDiverged(
                        f"train/loss became {mean} by step {step}; last good checkpoint: "
                        f"{'step ' + str(last[-1]) if last else 'none'} in {run_dir}; "
                        f"lower optim.lr or set optim.grad_clip"
                    )
                row.update({"train/loss": mean, "train/lr": lr})
                loss_sum.zero_()
                count, acc = 0, {"loss_sum": 0.0, "count": 0}
                bar.set_postfix_str(f"loss {mean:.4f}" + (f" eval {eval_loss:.4f}" if eval_loss is not None else ""))
            if step % t.eval_every == 0 or step == t.steps:
                eval_loss, eval_acc = evaluate(forward, task, eval_batch)
                row.update({"eval/loss": eval_loss, "eval/accuracy": eval_acc})
                stopped_early = t.stop_at_eval_loss is not None and eval_loss < t.stop_at_eval_loss
            if row:
                log.log({"step": step, **row})
            bar.update(1)
            final = stopped_early or step == t.steps
            if step % t.checkpoint_every == 0 or final:
                # carry the partial log window into the checkpoint so a resumed run logs the same numbers
                acc = {"loss_sum": acc["loss_sum"] + loss_sum.item(), "count": acc["count"] + count}
                loss_sum.zero_()
                count = 0
                path = save(step)
                if final and cfg.logger.log_checkpoint:
                    log.log_checkpoint([path, ck.state_path(run_dir, step), run_dir / "model_config.json"], step)
            if stopped_early:
                break
    finally:
        bar.close()
        log.close()
    return TrainResult(run_dir, step, eval_loss, eval_acc, stopped_early)
