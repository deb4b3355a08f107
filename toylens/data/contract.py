"""The Task contract, checked on samples before step 0 (``toylens-train``) or alone (``toylens-check-task``).

Every task, built-in or the user's, goes through ``check_task``: it samples small batches and checks each rule below.
A broken task raises ``TaskContractError`` with one line naming the method, the rule and the fix; nothing is trained
or written. Rules (each one's name is in its message):

- ``properties``: ``d_vocab``/``seq_len`` positive integers; ``token_names`` one string per token id;
- ``batch type``: ``sample``/``train_batch``/``eval_set`` return a ``toylens.data.Batch``;
- ``shape``: ``[batch_size, seq_len]`` rows (``train_batch`` may return another number of rows, e.g. a full batch);
- ``dtype``: tokens and targets ``torch.long`` (embeddings index with them, cross-entropy needs int64 targets);
- ``device``: on the generator's device;
- ``token range``: ``0 <= tokens < d_vocab``; ``target range``: the same for targets where ``loss_mask`` is set;
- ``loss positions``: at least one ``loss_mask`` position per batch;
- ``seeded``: the same seed gives the same batch (and ``eval_set``: the same held-out set);
- ``corrupt``: when the task offers it, a batch of the same shape and dtypes, ids in range, differing from the clean;
- ``accuracy``: a finite number in [0, 1] for random and for perfect logits.
"""

from __future__ import annotations

import math

import torch

from toylens.data.base import Batch, Task

ROWS = 8  # rows per checked batch: enough to catch a wrong shape or range, cheap for any task
SEEDS = (0, 1)


class TaskContractError(ValueError):
    """A task that breaks the contract; one line: the task, the method, the rule and the fix. ``passed``: the rules
    that held before it."""

    passed: list[str] = []


def _fail(task: Task, method: str, rule: str, problem: str, fix: str) -> None:
    raise TaskContractError(f"task {task.name}: {method} {problem} (rule: {rule}); {fix}")


def offers_corrupt(task: Task) -> bool:
    return corrupt_reason(task) is None


def corrupt_reason(task: Task) -> str | None:
    """None when ``task`` offers clean/corrupted pairs; else why not (no ``corrupt``, or the task's own reason)."""
    if type(task).corrupt is Task.corrupt:
        return f"the {task.name} task has no corrupt()"
    return task.corrupt_unavailable()


def _check_batch(task: Task, b, method: str, rows: int | None, device: torch.device,
                 passed: list[str] | None = None) -> Batch:
    """The per-batch rules, in order; each one that holds is added to ``passed`` (when given, once)."""

    def ok(rule: str) -> None:
        if passed is not None and rule not in passed:
            passed.append(rule)

    if not isinstance(b, Batch):
        _fail(task, method, "batch type", f"returned {type(b).__name__}", "return toylens.data.Batch(tokens, "
              "targets, loss_mask)")
    ok("batch type")
    if (rows is not None and b.tokens.shape[0] != rows) or b.tokens.shape[1] != task.seq_len:
        want = f"[{rows if rows is not None else 'n'}, {task.seq_len}]"
        _fail(task, method, "shape", f"returned tokens of shape {list(b.tokens.shape)}, not {want}",
              f"return batch_size rows of seq_len={task.seq_len} tokens (or change seq_len)")
    ok("shape")
    for what in ("tokens", "targets"):
        t = getattr(b, what)
        if t.dtype != torch.long:
            _fail(task, method, "dtype", f"returned {what} of dtype {t.dtype}", f"return torch.long {what} "
                  f"(e.g. {what}.long())")
    ok("dtype")
    if b.tokens.device.type != device.type:
        _fail(task, method, "device", f"returned tensors on {b.tokens.device}, the generator is on {device}",
              "create tensors on generator.device")
    ok("device")
    lo, hi = int(b.tokens.min()), int(b.tokens.max())
    if lo < 0 or hi >= task.d_vocab:
        _fail(task, method, "token range", f"returned token id {lo if lo < 0 else hi} outside [0, d_vocab="
              f"{task.d_vocab})", "return ids below d_vocab (or raise d_vocab)")
    ok("token range")
    if not bool(b.loss_mask.any()):
        _fail(task, method, "loss positions", "returned a batch with no loss_mask position set",
              "set loss_mask where the model must predict targets")
    ok("loss positions")
    tgt = b.targets[b.loss_mask]
    lo, hi = int(tgt.min()), int(tgt.max())
    if lo < 0 or hi >= task.d_vocab:
        _fail(task, method, "target range", f"returned target id {lo if lo < 0 else hi} at a loss position, "
              f"outside [0, d_vocab={task.d_vocab})", "return targets below d_vocab where loss_mask is set")
    ok("target range")
    return b


def _same(a: Batch, b: Batch) -> bool:
    return all(torch.equal(x, y) for x, y in ((a.tokens, b.tokens), (a.targets, b.targets),
                                               (a.loss_mask, b.loss_mask)))


def _call(task: Task, method: str, fn, *args):
    try:
        return fn(*args)
    except NotImplementedError:
        _fail(task, method, "implemented", "is not implemented", f"define {method.split('(')[0]} on your Task")
    except Exception as e:
        text = " ".join(str(e).split())[:200] or "(no message)"
        _fail(task, method, "runs", f"raised {type(e).__name__}: {text}", "fix the method")


def check_task(task: Task, device: str | torch.device = "cpu") -> list[str]:
    """Check ``task`` against the contract; returns the rules that passed, raises ``TaskContractError`` at the
    first one broken (its ``passed``: the rules checked before it, which toylens-check-task prints)."""
    passed: list[str] = []
    try:
        _check_rules(task, torch.device(device), passed)
    except TaskContractError as e:
        e.passed = list(passed)
        raise
    return passed


def _check_rules(task: Task, dev: torch.device, passed: list[str]) -> None:
    """The rules in order, each appended to ``passed`` once it holds."""
    for prop in ("d_vocab", "seq_len"):
        v = _call(task, prop, lambda p=prop: getattr(task, p))
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            _fail(task, prop, "properties", f"is {v!r}", f"make {prop} a positive int")
    names = _call(task, "token_names", lambda: task.token_names)
    if not isinstance(names, (list, tuple)) or len(names) != task.d_vocab or not all(isinstance(n, str)
                                                                                    for n in names):
        n = len(names) if isinstance(names, (list, tuple)) else type(names).__name__
        _fail(task, "token_names", "properties", f"gives {n} names for d_vocab={task.d_vocab}",
              "return one string per token id")
    passed.append("properties")

    def gen(seed: int) -> torch.Generator:
        return torch.Generator(device=dev).manual_seed(seed)

    a = _check_batch(task, _call(task, "sample()", task.sample, ROWS, gen(SEEDS[0])), "sample()", ROWS, dev, passed)
    b = _check_batch(task, _call(task, "sample()", task.sample, ROWS, gen(SEEDS[0])), "sample()", ROWS, dev)
    if not _same(a, b):
        _fail(task, "sample()", "seeded", "returned different batches for the same seed",
              "draw every random number from the generator argument (torch.randint(..., generator=generator))")
    passed.append("seeded")
    tb = _check_batch(task, _call(task, "train_batch()", task.train_batch, ROWS, gen(SEEDS[1])), "train_batch()",
                      None, dev)
    e1 = _check_batch(task, _call(task, "eval_set()", task.eval_set, ROWS, 7, dev), "eval_set()", ROWS, dev)
    e2 = _call(task, "eval_set()", task.eval_set, ROWS, 7, dev)
    if not _same(e1, e2):
        _fail(task, "eval_set()", "seeded", "returned different held-out sets for the same seed",
              "draw the held-out set from a generator seeded with the seed argument")
    passed.append("eval_set")
    if offers_corrupt(task):
        c = _call(task, "corrupt()", task.corrupt, a, gen(SEEDS[1]))
        c = _check_batch(task, c, "corrupt()", ROWS, dev)
        if torch.equal(c.tokens, a.tokens):
            _fail(task, "corrupt()", "corrupt", "returned the clean tokens unchanged",
                  "return corrupted counterparts that differ from the clean batch (or do not define corrupt)")
        passed.append("corrupt")
    for label, logits in (("random", torch.randn(*tb.tokens.shape, task.d_vocab, generator=gen(2), device=dev)),
                          ("perfect", torch.nn.functional.one_hot(torch.where(tb.loss_mask, tb.targets, 0),
                                                                 task.d_vocab).float() * 10)):
        acc = _call(task, "accuracy()", task.accuracy, logits, tb)
        try:
            v = float(acc)
        except (TypeError, ValueError, RuntimeError):
            _fail(task, "accuracy()", "accuracy", f"returned {type(acc).__name__}, not a number",
                  "return a 0-dim tensor or a float")
        if not (math.isfinite(v) and 0.0 <= v <= 1.0):
            _fail(task, "accuracy()", "accuracy", f"returned {v} for {label} logits", "return a fraction in [0, 1]")
    passed.append("accuracy")
