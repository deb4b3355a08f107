"""``toylens-check-task <task> [key=value ...]``: the Task contract check that ``toylens-train`` runs before step 0,
alone. ``<task>``: a built-in or plugin name, ``module:Class`` or ``path/to/file.py:Class``; ``key=value`` (or
``task.key=value``): the task's own settings. Prints each rule and one decoded sample; a broken task is one line
on stderr naming the method and the rule, exit 2."""

from __future__ import annotations

import sys

PROG = "toylens-check-task"
USAGE = (f"usage: {PROG} <name | module:Class | path/to/file.py:Class> [key=value ...]   "
         f"(e.g. {PROG} parity.py:Parity n_bits=12)")


def check(argv: list[str]) -> str:
    """The report printed on success; raises ValueError (one line) on a broken task or bad arguments."""
    import dataclasses

    from omegaconf import OmegaConf

    from toylens.data.contract import check_task, corrupt_reason
    from toylens.data.registry import make_task, task_config

    if not argv or argv[0].startswith("-") or "=" in argv[0]:
        raise ValueError(USAGE)
    ref, sets = argv[0], argv[1:]
    bad = next((s for s in sets if "=" not in s), None)
    if bad is not None:
        raise ValueError(f"{bad!r}: settings are key=value (e.g. n_bits=12); {USAGE}")
    cfg = task_config(ref)
    if sets:
        try:
            extra = OmegaConf.to_container(OmegaConf.from_dotlist([s.removeprefix("task.") for s in sets]))
        except Exception as e:
            raise ValueError(f"cannot parse {' '.join(sets)} ({str(e).splitlines()[0]})") from None
        known = {f.name for f in dataclasses.fields(cfg)}
        unknown = sorted(set(extra) - known)
        if unknown:
            import difflib

            near = difflib.get_close_matches(unknown[0], sorted(known), n=1)
            hint = f"did you mean {near[0]}?" if near else f"its settings: {', '.join(sorted(known))}"
            raise ValueError(f"task.{unknown[0]} is not a setting of {type(cfg).__name__}; {hint}")
        cfg = task_config({**dataclasses.asdict(cfg), **extra})
    try:
        task = make_task(cfg)
    except (ValueError, TypeError) as e:
        raise ValueError(f"task ({cfg.name}): {' '.join(str(e).split())}") from None
    passed = check_task(task)  # TaskContractError carries the rules that held before it (main prints them)
    import torch

    b = task.sample(1, torch.Generator().manual_seed(0))
    names = task.token_names
    toks = " ".join(names[i] for i in b.tokens[0].tolist())
    answers = ", ".join(f"{p}:{names[t]}" for p, t in zip(b.loss_mask[0].nonzero().flatten().tolist(),
                                                            b.targets[0][b.loss_mask[0]].tolist(), strict=True))
    why_not = corrupt_reason(task)
    pairs = "offered" if why_not is None else f"not offered ({why_not}; patching, tracing, discovery left out)"
    lines = [f"task {task.name} ({cfg.name}): d_vocab {task.d_vocab}, seq_len {task.seq_len}, corrupt() {pairs}",
             *(f"  PASS  {rule}" for rule in passed),
             f"sample 0: {toks}", f"  loss positions -> targets: {answers}"]
    return "\n".join(lines)


def main() -> None:
    from toylens import _cli

    argv = sys.argv[1:]
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip().replace("``", "") + "\n\n" + USAGE)  # plain text: the docstring's RST quotes dropped
        return
    try:
        print(check(argv))
    except ValueError as e:  # TaskRefError, TaskContractError, bad settings: one line
        for rule in getattr(e, "passed", []):  # what held before the broken rule, as a passing check prints it
            print(f"  PASS  {rule}")
        sys.stdout.flush()
        _cli.fail(PROG, str(e), 2)


if __name__ == "__main__":
    main()
