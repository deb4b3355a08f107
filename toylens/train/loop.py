"""The training loop: a flat, readable function in the nanoGPT spirit. ``train(cfg)`` is what the
CLI calls and what tests call directly."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from toylens.data import Batch, Task, make_task
from toylens.model import fused
from toylens.model.build import build_model, model_config_dict
from toylens.runs import checkpoint as ck
from toylens.runs.config import (
    ConfigError,
    TrainConfig,
    resolve_device,
    resolve_precision,
    resolve_threads,
    validate,
)
from toylens.runs.lock import RunLock
from toylens.runs.loggers import JsonlLogger, Loggers, WandbLogger
from toylens.train.optim import make_optimizer
from toylens.train.resume import resume_checkpoint, schedule_length


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C: the message names the last finished step, the last checkpoint and how to continue."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    eval_loss: float | None
    eval_accuracy: float | None
    stopped_early: bool
    stop_reason: str | None = None  # e.g. "eval/loss 0.0045 < 0.01" when a stop_at_* target ended the run

    def summary(self) -> str:
        """One line with the final metrics, saying why the run ended when it stopped early."""
        ev = "" if self.eval_loss is None else f"eval/loss {self.eval_loss:.4g}, eval/accuracy {self.eval_accuracy:.4g}"
        if self.stop_reason:
            return f"stopped at step {self.step}: {self.stop_reason}" + (f"; {ev}" if ev else "")
        return f"step {self.step}" + (f", {ev}" if ev else "")


def _fix_for_divergence(o) -> str:
    """What to change after a NaN: only settings that are not already doing their job."""
    tips = [f"lower optim.lr (now {o.lr:g})"]
    if o.grad_clip is None:
        tips.append("set optim.grad_clip=1.0")
    if o.warmup_steps == 0:
        tips.append("set optim.warmup_steps=100")
    return ", ".join(tips[:-1]) + (" or " if len(tips) > 1 else "") + tips[-1]


def _last_good(run_dir: Path) -> str:
    last = ck.list_checkpoints(run_dir)
    return f"step {last[-1]} in {run_dir}" if last else f"none in {run_dir}"


def new_run_dir(cfg: TrainConfig) -> Path:
    """``<checkpoint_root>/<name>/<YYYY-mm-dd_HH-MM-SS>`` (Python API; the CLI gets it from Hydra)."""
    base = Path(cfg.checkpoint_root).expanduser().resolve() / cfg.name / time.strftime("%Y-%m-%d_%H-%M-%S")
    run_dir, i = base, 1
    while run_dir.exists():
        run_dir, i = base.with_name(f"{base.name}_{i}"), i + 1
    return run_dir


def _check_fresh(run_dir: Path) -> None:
    if ck.list_checkpoints(run_dir):
        raise ConfigError(f"run directory {run_dir} already holds a run; continue it with resume={run_dir} "
                          f"or choose another hydra.run.dir")
    if (run_dir / "metrics.jsonl").exists():  # killed before its first checkpoint: nothing to continue
        print(f"toylens: {run_dir} holds a run that stopped before its first checkpoint; starting it over",
              file=sys.stderr)
        ck.write_text(run_dir / "metrics.jsonl", "")


def pick_forward(model, mode: str):
    """``forward(tokens, positions=None)``: the fused engine when it computes this model exactly, else the
    model's own forward; with ``positions`` only those positions' logits (the engine then computes the
    last block there alone)."""
    why = fused.fast_path_reason(model)
    if mode == "on" and why:
        raise ConfigError(f"train.fast_forward=on but the fused forward does not cover {why}; use auto or off")
    if mode == "off" or why:
        return lambda tokens, positions=None: model(tokens) if positions is None else model(tokens)[:, positions]
    return partial(fused.forward, model)


def loss_positions(mask: torch.Tensor) -> torch.Tensor | None:
    """The positions every row's loss reads, when all rows read the same ones and not all of them."""
    cols = mask.any(0)
    if bool(cols.all()) or not bool((mask == cols).all()):
        return None
    return cols.nonzero().flatten()


def make_train_step(model, forward, opt, sched, task: Task, gen: torch.Generator, cfg: TrainConfig):
    """One optimisation step as a closure returning ``(loss, lr)``; the loss stays on the device
    (no host sync). The loop and ``benchmarks/train_speed.py`` both time exactly this."""
    t, o = cfg.train, cfg.optim
    device = gen.device.type
    trainable = [p for p in model.parameters() if p.requires_grad]
    fwd = torch.compile(forward) if t.compile else forward
    bf16 = resolve_precision(t.precision, str(gen.device)) == "bf16"

    def step() -> tuple[torch.Tensor, float]:
        batch = task.train_batch(t.batch_size, gen)  # modular_add: the full training split
        targets = batch.targets.masked_fill(~batch.loss_mask, -100)
        positions = loss_positions(batch.loss_mask)  # e.g. modular_add: the answer position alone
        if positions is not None:
            targets = targets[:, positions]
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            logits = fwd(batch.tokens, positions)
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


def resume_note(start: int, schedule_steps: int, steps: int) -> str:
    """What a resume past the lr schedule's end does: the steps still to run (``start + 1`` on, and only those after
    the schedule's end) run at its final rate."""
    first = max(start, schedule_steps) + 1
    return (f"toylens: resuming at step {start}; the learning-rate schedule keeps its {schedule_steps} steps, so steps "
            f"{first}-{steps} run at its final rate; pass optim.schedule_steps=N to stretch it")


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
    threads = torch.get_num_threads()
    lock = RunLock(run_dir).acquire()  # one process per run directory, for as long as it trains
    try:
        n_threads = resolve_threads(cfg.threads)
        if n_threads:
            torch.set_num_threads(n_threads)
        return _train_locked(cfg, run_dir, device, overrides)
    finally:
        lock.release()
        torch.set_num_threads(threads)


def _train_locked(cfg: TrainConfig, run_dir: Path, device: str, overrides: list[str] | None) -> TrainResult:
    if not cfg.resume:
        _check_fresh(run_dir)
    start, weights, state = resume_checkpoint(run_dir, device) if cfg.resume else (0, None, None)
    task = make_task(cfg.task)
    model = build_model(cfg.model, task.d_vocab, task.seq_len, cfg.seed, device)
    t, o = cfg.train, cfg.optim
    schedule_steps = schedule_length(cfg, state)
    opt, sched = make_optimizer(model, o, schedule_steps)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    eval_batch = task.eval_set(t.eval_size, t.eval_seed, device)
    train_set = task.train_set(device)  # a fixed finite training split (modular_add) is evaluated too

    forward = pick_forward(model, t.fast_forward)
    train_step = make_train_step(model, forward, opt, sched, task, gen, cfg)

    acc: dict = {"loss_sum": 0.0, "count": 0}
    wandb_id = None
    if state is not None:  # resume from checkpoint ``start`` (a run with none restarts from step 0)
        model.load_state_dict(weights)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        ck.set_rng_state(state["rng"], gen)
        acc, wandb_id = state.get("log_accumulator", acc), state.get("wandb_id")
        ck.truncate_metrics(run_dir, start)
        if start >= t.steps:
            last = next((r for r in reversed(ck.read_metrics(run_dir)) if "eval/loss" in r), {})
            print(f"toylens: {run_dir} is already at step {start} >= train.steps={t.steps}; "
                  f"pass a larger train.steps to continue", file=sys.stderr)
            return TrainResult(run_dir, start, last.get("eval/loss"), last.get("eval/accuracy"), False)
        if t.steps > schedule_steps:
            print(resume_note(start, schedule_steps, t.steps), file=sys.stderr)
    elif cfg.resume:
        ck.truncate_metrics(run_dir, 0)
    else:
        from toylens.runs.task_source import write_task_source

        # the task as it rebuilds from any directory (absolute paths, data hashes), and where its code came from
        saved = dataclasses.replace(cfg, task=task.pinned_config())
        write_task_source(run_dir, task)
        resolved = OmegaConf.to_yaml(OmegaConf.structured(saved))
        ck.write_text(run_dir / ".hydra" / "config.yaml", resolved)
        if overrides is not None:
            ck.write_text(run_dir / ".hydra" / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
        ck.write_json(run_dir / "model_config.json", model_config_dict(model))

    sinks: list = [JsonlLogger(run_dir)]
    if cfg.logger.name == "wandb":
        sinks.append(WandbLogger(cfg.logger, run_dir, cfg.to_dict(), resume_id=wandb_id))
    log = Loggers(sinks)

    def save(step: int) -> Path:
        bad = ck.first_non_finite(model, opt)
        if bad is not None:  # never write a checkpoint that could not be trained on
            raise TrainingDiverged(f"{bad} holds NaN or inf at step {step}, so it was not saved; last finite "
                                   f"checkpoint: {_last_good(run_dir)}; {_fix_for_divergence(o)}")
        state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": ck.rng_state(gen),
                 "log_accumulator": dict(acc), "wandb_id": log.wandb_id, "schedule_steps": schedule_steps}
        path = ck.save_checkpoint(run_dir, step, model, state)
        ck.prune_checkpoints(run_dir, t.keep_last)
        return path

    loss_sum = torch.zeros((), device=device)  # summed on device: no host sync per step
    count = 0
    eval_loss = eval_acc = None
    stopped_early, stop_reason = False, None
    step = done = start
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
                    raise TrainingDiverged(f"train/loss became {mean} by step {step}; last good checkpoint: "
                                           f"{_last_good(run_dir)}; {_fix_for_divergence(o)}")
                row.update({"train/loss": mean, "train/lr": lr})
                loss_sum.zero_()
                count, acc = 0, {"loss_sum": 0.0, "count": 0}
                bar.set_postfix_str(f"loss {mean:.4f}" + (f" eval {eval_loss:.4f}" if eval_loss is not None else ""))
            if step % t.eval_every == 0 or step == t.steps:
                eval_loss, eval_acc = evaluate(forward, task, eval_batch)
                row.update({"eval/loss": eval_loss, "eval/accuracy": eval_acc})
                if train_set is not None:
                    train_metrics = evaluate(forward, task, train_set)
                    row.update(zip(("eval/train_loss", "eval/train_accuracy"), train_metrics, strict=True))
                stop_reason = stop_target_reached(t, eval_loss, eval_acc)
                stopped_early = stop_reason is not None
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
            done = step
            if stopped_early:
                break
    except KeyboardInterrupt:
        last = ck.list_checkpoints(run_dir)
        raise TrainingInterrupted(f"interrupted at step {done}; the last checkpoint is "
                                  f"{'step ' + str(last[-1]) if last else 'none yet'}; continue with "
                                  f"toylens-train resume={run_dir}") from None
    finally:
        bar.close()
        log.close()
    return TrainResult(run_dir, step, eval_loss, eval_acc, stopped_early, stop_reason)


def stop_target_reached(t, eval_loss: float, eval_acc: float) -> str | None:
    """Why the run should stop now (``train.stop_at_eval_loss`` / ``train.stop_at_accuracy``), or None."""
    if t.stop_at_eval_loss is not None and eval_loss < t.stop_at_eval_loss:
        return f"eval/loss {eval_loss:.4g} < {t.stop_at_eval_loss:g}"
    if t.stop_at_accuracy is not None and eval_acc >= t.stop_at_accuracy:
        return f"eval/accuracy {eval_acc:.4g} >= {t.stop_at_accuracy:g}"
    return None
