"""Run-directory I/O: atomic writes, checkpoints (safetensors weights, ``weights_only`` state with the weights'
checksum), metrics.jsonl. Layout and guarantees: docs/internals.md, "Run-directory I/O"."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

CKPT_DIR = "ckpt"
_UMASK = os.umask(0)  # read once (os.umask can only be read by setting it)
os.umask(_UMASK)
_STEP_RE = re.compile(r"^step_(\d+)\.safetensors$")
_STATE_RE = re.compile(r"^step_(\d+)\.state\.pt$")


class CheckpointError(RuntimeError):
    """A run directory or checkpoint that cannot be read; the message says which file and why."""


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path`` (same directory, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give them the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: Path, text: str) -> None:
    def _w(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, _w)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


# --- checkpoints --------------------------------------------------------------------------------
def weights_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step_{step:06d}.safetensors"


def state_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step_{step:06d}.state.pt"


def list_checkpoints(run_dir: Path) -> list[int]:
    """Steps with a complete checkpoint (weights present), ascending."""
    d = Path(run_dir) / CKPT_DIR
    if not d.is_dir():
        return []
    steps = [int(m.group(1)) for p in d.iterdir() if (m := _STEP_RE.match(p.name))]
    return sorted(steps)


def rng_state(generator: torch.Generator | None = None) -> dict:
    """Every RNG a run touches, in weights_only-loadable form (tensors, ints, lists)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": _py_state_to_list(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_plain, np_state[2:])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["data"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_py_state_from_list(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None:
        generator.set_state(state["data"])


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def _py_state_to_list(s: tuple) -> list:
    return [s[0], list(s[1]), s[2]]


def _py_state_from_list(s: list) -> tuple:
    return (s[0], tuple(s[1]), s[2])


def _write_bytes(data: bytes) -> Callable[[str], None]:
    def _w(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return _w


def first_non_finite(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> str | None:
    """The name of the first parameter (or optimizer state entry) holding NaN or inf; None when all finite."""
    for name, p in model.named_parameters():
        if not bool(p.detach().isfinite().all()):
            return name
    if optimizer is not None:
        for i, st in enumerate(optimizer.state.values()):
            for key, v in st.items():
                if torch.is_tensor(v) and v.is_floating_point() and not bool(v.isfinite().all()):
                    return f"optimizer state {key} of parameter {i}"
    return None


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, state: dict) -> Path:
    """Write ``state`` (optimizer, scheduler, step, RNG..., and the weights' SHA-256) then the weights
    (the commit: the checkpoint exists once they are in place); returns the weights path."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    data = save_bytes(tensors, metadata={"step": str(step), "format": "toylens"})
    torch_state = {**state, "step": step, "weights_sha256": hashlib.sha256(data).hexdigest()}
    atomic_write(state_path(run_dir, step), lambda tmp: torch.save(torch_state, tmp))
    wpath = weights_path(run_dir, step)
    atomic_write(wpath, _write_bytes(data))
    return wpath


def _checked(run_dir: Path, path: Path) -> Path:
    """``path`` itself, unless it is a symlink or lies outside ``run_dir`` (then CheckpointError)."""
    if path.is_symlink() or path.parent.is_symlink():
        raise CheckpointError(f"{path}: a symlink; toylens reads only checkpoint files inside the run directory, "
                              f"replace it with the file itself")
    if path.exists() and not path.resolve().is_relative_to(Path(run_dir).resolve()):
        raise CheckpointError(f"{path}: resolves outside the run directory {run_dir}; refused")
    return path


def load_weights(run_dir: Path, step: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The weights of checkpoint ``step``, after checking the file against the SHA-256 in its state file."""
    path = _checked(run_dir, weights_path(run_dir, step))
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint; steps available: {list_checkpoints(run_dir)}") from None
    try:
        tensors = load_bytes(data)
    except Exception as e:  # safetensors raises SafetensorError/OSError on truncated or tampered files
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({str(e).splitlines()[0]}); "
            f"it may be truncated or corrupted, use another checkpoint"
        ) from None
    spath = state_path(run_dir, step)
    expected = load_state(run_dir, step).get("weights_sha256") if spath.exists() else None
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise CheckpointError(f"{path}: contents differ from the checksum saved in {spath.name} (the file was "
                              f"changed or corrupted after it was written); use another checkpoint")
    return {k: v.to(device) for k, v in tensors.items()} if str(device) != "cpu" else tensors


def load_state(run_dir: Path, step: int) -> dict:
    path = _checked(run_dir, state_path(run_dir, step))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing state file for step {step}") from None
    except Exception as e:  # weights_only refuses anything that would unpickle code
        raise CheckpointError(
            f"{path}: refused to load ({str(e).splitlines()[0][:200]}); state files must load with "
            f"weights_only=True (no pickled code)"
        ) from None


def remove_leftovers(run_dir: Path) -> list[str]:
    """Delete what a killed writer leaves: ``.<name>.<random>.tmp`` files of ``atomic_write`` in the run
    and its ckpt/, and state files whose weights never landed. Returns the names removed."""
    run_dir = Path(run_dir)
    removed = []
    for d in (run_dir, run_dir / CKPT_DIR, run_dir / ".hydra"):
        if not d.is_dir() or d.is_symlink():
            continue
        for p in d.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file() and not p.is_symlink():
                p.unlink()
                removed.append(str(p.relative_to(run_dir)))
    d = run_dir / CKPT_DIR
    if d.is_dir() and not d.is_symlink():
        for p in d.iterdir():
            m = _STATE_RE.match(p.name)
            if m and p.is_file() and not weights_path(run_dir, int(m.group(1))).exists():
                p.unlink()
                removed.append(str(p.relative_to(run_dir)))
    return sorted(removed)


def prune_checkpoints(run_dir: Path, keep_last: int) -> list[int]:
    """Delete all but the newest ``keep_last`` checkpoints; returns the steps removed."""
    steps = list_checkpoints(run_dir)
    removed = steps[:-keep_last] if keep_last > 0 else []
    for step in removed:
        weights_path(run_dir, step).unlink(missing_ok=True)  # weights first: the checkpoint stops existing
        state_path(run_dir, step).unlink(missing_ok=True)
    return removed


# --- metrics.jsonl ------------------------------------------------------------------------------
def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start}); it was changed after training") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            # A crash can cut the last line short; anything earlier is corruption worth naming.
            if i == len(lines):
                break
            raise CheckpointError(f"{path}:{i}: not valid JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("step", 0), int):
            raise CheckpointError(f"{path}:{i}: not a JSON object with an integer step ({line[:40]!r})")
        rows.append(row)
    return rows


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Keep only rows with step <= last_step (a resumed run re-logs what came after its checkpoint)."""
    rows = [r for r in read_metrics(run_dir) if r.get("step", 0) <= last_step]
    write_text(Path(run_dir) / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
