"""``toylens-sae run=<run dir> hook=blocks.0.hook_mlp_out [d_sae=512 l1=5 steps=1500 ...]``: train a sparse
autoencoder on one hook of a run with SAELens, evaluate it and write ``<run>/sae/<hook>/`` (SAELens's own
``cfg.json`` + ``sae_weights.safetensors``, ``toylens_sae.json`` and the page ``report/index.html``); prints the
page's path. Bad input exits 2 with one line naming the field and the fix, before anything is written; an
``sae/<hook>/`` folder toylens did not write is never replaced. Logs to the run's wandb run when it has one.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

from toylens import _cli
from toylens.runs.config import ConfigError

PROG = "toylens-sae"
SAE_MARKER = ".toylens-sae"
_POSITIVE = ("d_sae", "steps", "batch_tokens", "log_every", "dead_window", "eval_sequences", "cards")


@dataclasses.dataclass
class SAECommand:
    run: str | None = None  # the run directory toylens-train printed (required)
    hook: str | None = None  # hook to train on, e.g. blocks.0.hook_mlp_out (required)
    step: int | None = None  # checkpoint step (null: the last)
    eval_sequences: int = 512  # held-out task sequences for the evaluation and the cards
    cards: int = 8  # latent cards on the page
    threads: int = 0  # torch CPU threads; 0: auto, as toylens-train (1 when the cores are busy, else one per core)


def _settings_cls():
    from toylens.analyze.sae.train import SAESettings

    return SAESettings


def _value(key: str, text: str, kind: type):
    if text.lower() in ("null", "none", "~"):
        return None
    try:
        return kind(text) if kind is not int else int(text)
    except ValueError:
        raise ConfigError(f"{key}={text}: not a{'n integer' if kind is int else ' number'}; "
                          f"give e.g. {key}={kind(1)}") from None


def parse(argv: list[str]):
    """(SAECommand, SAESettings) from ``key=value`` arguments; ConfigError (one line) on anything wrong."""
    s_cls = _settings_cls()
    cmd, settings = SAECommand(), s_cls()
    types = {f.name: (cmd, f) for f in dataclasses.fields(cmd)} | {f.name: (settings, f)
                                                                   for f in dataclasses.fields(settings)}
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"{arg!r} is not key=value; use e.g. {PROG} run=<run dir> hook=blocks.0.hook_mlp_out")
        key, text = arg.split("=", 1)
        if key not in types:
            raise ConfigError(_cli.unknown_key_message(key, sorted(types)))
        obj, f = types[key]
        kind = {"int": int, "float": float, "int | None": int, "str | None": str}.get(str(f.type), str)
        setattr(obj, key, _value(key, text, kind) if kind is not str else (text or None))
    _validate(cmd, settings)
    return cmd, settings


def _validate(cmd: SAECommand, s) -> None:
    if not cmd.run:
        raise ConfigError(f"run is required: {PROG} run=<the directory toylens-train printed> hook=<hook name>")
    if not cmd.hook:
        raise ConfigError(f"hook is required: {PROG} run={cmd.run} hook=blocks.0.hook_mlp_out (or another hook)")
    for key in _POSITIVE:
        v = getattr(cmd, key, None) if hasattr(cmd, key) else getattr(s, key)
        if v is None or v <= 0:
            raise ConfigError(f"{key}={v}: must be a positive integer; e.g. {key}={getattr(type(s)(), key, 8)}")
    if s.l1 is None or s.l1 < 0:
        raise ConfigError(f"l1={s.l1}: the L1 coefficient must be >= 0; e.g. l1=5")
    if s.lr is None or s.lr <= 0:
        raise ConfigError(f"lr={s.lr}: the learning rate must be > 0; e.g. lr=0.001")
    if cmd.threads is None or cmd.threads < 0:
        raise ConfigError(f"threads={cmd.threads}: must be an integer >= 0 (0: auto)")
    if s.seed is None or s.seed < 0:
        raise ConfigError(f"seed={s.seed}: must be an integer >= 0")


def is_toylens_sae(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and (path / SAE_MARKER).is_file()


def check_sae_dir(path: Path) -> None:
    """Refuse (ConfigError) to replace a ``sae/<hook>`` that exists and is not one toylens wrote."""
    if path.parent.is_symlink() or (path.parent.exists() and not path.parent.is_dir()):
        raise ConfigError(f"hook: {path.parent} is not a folder toylens can write SAEs into; move it away")
    if path.is_symlink() or (path.exists() and not is_toylens_sae(path)):
        raise ConfigError(f"hook: {path} exists and toylens did not write it (no {SAE_MARKER}); move it away "
                          f"or train on another hook")


def write_sae_dir(final: Path, fill) -> None:
    """Build ``final`` in a temporary sibling (``fill(tmp)`` writes into it), then swap it in under a lock on
    the parent; a failure leaves the previous folder as it was and nothing new behind."""
    import fcntl

    parent = final.parent
    made_parent = not parent.exists()
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{final.name}.tmp-"))
    try:
        os.chmod(tmp, 0o755)
        fill(tmp)
        (tmp / SAE_MARKER).write_text("written by toylens-sae; this folder is replaced when the SAE is retrained\n")
        fd = os.open(parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            check_sae_dir(final)
            old = None
            if final.exists():
                old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
                os.replace(final, old)
            os.replace(tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if made_parent and parent.exists() and not any(parent.iterdir()):
            parent.rmdir()
        raise


FOOTER = ("<footer>Made by toylens-sae. report.json holds every number on this page; the SAE itself (SAELens's "
          "cfg.json and sae_weights.safetensors) is in the folder above.</footer>")


def _own_footer(page: Path) -> None:
    """The shared renderer signs pages as toylens-analyze's; this page is toylens-sae's."""
    import re

    text = page.read_text(encoding="utf-8")
    page.write_text(re.sub(r"<footer>.*?</footer>", lambda _: FOOTER, text, count=1, flags=re.S), encoding="utf-8")


def main_of(argv: list[str]) -> Path:
    """The command without ``sys.exit``: returns the page's path; ConfigError/RunError on bad input."""
    cmd, settings = parse(argv)
    from toylens.runs.run import load_run

    if "/" in cmd.hook or cmd.hook.startswith("."):
        raise ConfigError(f"hook={cmd.hook}: not a hook name; use e.g. hook=blocks.0.hook_mlp_out")
    run = load_run(cmd.run)
    final = run.path / "sae" / cmd.hook
    check_sae_dir(final)
    step = run.pin(cmd.step)
    import torch

    from toylens.runs.config import resolve_threads

    torch.set_num_threads(resolve_threads(cmd.threads))
    model = run.model(step)
    from toylens.analyze.sae.train import sae_hooks

    valid = sae_hooks(model, run.batch(1).tokens)
    if cmd.hook not in valid:
        raise ConfigError(f"hook={cmd.hook}: not a hook with one vector per position in this model; choose one of "
                          f"{', '.join(valid)}")
    from toylens.analyze.sae.pipeline import sae_of_run
    from toylens.report.html import dumps, write_report
    from toylens.report.sae_page import headline, sae_report

    result: dict = {}

    def fill(tmp: Path) -> None:
        r = sae_of_run(model, run.task, cmd.hook, settings, out_dir=tmp, step=step,
                       eval_sequences=cmd.eval_sequences, n_cards=cmd.cards)
        rep = sae_report(r, run.name, str(run.path), run.task.name)
        (tmp / "toylens_sae.json").write_text(dumps(r.to_dict()), encoding="utf-8")
        page = write_report(rep, tmp / "report")
        _own_footer(page)
        result.update(r=r, rep=rep)

    write_sae_dir(final, fill)
    print(f"{PROG}: {cmd.hook} of {run.name} (step {step}): {headline(result['r'])}", file=sys.stderr)
    wandb_id = run.wandb_id()
    if wandb_id is not None:
        from toylens.report.sae_wandb import log_sae

        log_sae(run, result["r"], result["rep"], final, wandb_id)
    return final / "report" / "index.html"


HELP = """toylens-sae: train a sparse autoencoder (SAELens) on one hook of a toylens run, evaluate it (CE loss
recovered, L0, explained variance, latent cards) and write <run>/sae/<hook>/ with its report page.

Usage:
  toylens-sae run=<run dir> hook=blocks.0.hook_mlp_out
  toylens-sae run=<run dir> hook=blocks.1.hook_resid_post d_sae=1024 l1=3 steps=3000

Settings (key=default):
{settings}
"""


def help_text() -> str:
    return HELP.format(settings="\n".join(_cli.settings_lines(SAECommand()) + _cli.settings_lines(_settings_cls()())))


def main() -> None:
    argv = sys.argv[1:]
    if any(a in _cli._HELP_FLAGS for a in argv):
        print(help_text())
        return
    from toylens.runs.checkpoint import CheckpointError
    from toylens.runs.run import RunError

    try:
        print(main_of(argv))
    except (ConfigError, RunError) as e:
        _cli.fail(PROG, str(e), 2)
    except CheckpointError as e:
        _cli.fail(PROG, str(e), 1)
    except KeyboardInterrupt:
        _cli.fail(PROG, "interrupted; nothing was written", 130)


if __name__ == "__main__":
    main()
