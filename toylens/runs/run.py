"""Load a training run directory (``load_run``): its config, task, metrics, checkpoints and models, read and never
written; every problem is one line naming the file and the fix. Details: docs/internals.md, "Loading a run"."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toylens.runs import checkpoint as ck
from toylens.runs.checkpoint import CheckpointError

if TYPE_CHECKING:  # imported lazily: TransformerLens alone takes seconds to import
    import torch

    from toylens._compat import HookedTransformer
    from toylens.data import Batch, Task
    from toylens.runs.config import TrainConfig

# Batches drawn for analysis use their own seeds, far from any training or eval seed.
ANALYSIS_SEED = 20_240_004
FOLD_CHECK_ROWS = 256
# float32 folding of a trained, confident model moves log-probs by a few 1e-4 (5.6e-4 on seed 004's
# model, whose log-probs reach -55), so 1e-4 (fold's own default) is too tight for real runs.
FOLD_TOL = 1e-4
_REQUIRED_MODEL_KEYS = ("n_layers", "d_model", "n_heads", "d_head", "d_vocab", "n_ctx")


class RunError(CheckpointError):
    """A path that is not a usable run directory; the message is one line naming the file and the fix."""


def _one_line(e: BaseException | str, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Run:
    """A training run directory, read (never written). Build it with ``load_run``.

    ``config``: the run's ``TrainConfig`` (from ``.hydra/config.yaml``); ``model_config``: the
    ``HookedTransformerConfig`` fields from ``model_config.json``; ``steps``: checkpoint steps,
    ascending; ``metrics``: the rows of ``metrics.jsonl`` (``step``, ``train/loss``, ``eval/loss``...).
    """

    path: Path
    config: TrainConfig
    model_config: dict
    steps: list[int]
    metrics: list[dict]
    _pinned: dict = field(default_factory=dict, repr=False, compare=False)  # step -> (weights, state) in memory

    @property
    def name(self) -> str:
        """``<experiment>/<directory name>``, e.g. ``no_pos_prev_token/2025-01-01_12-00-00``."""
        return f"{self.config.name}/{self.path.name}"

    @property
    def last_step(self) -> int:
        return self.steps[-1]

    @property
    def positional_embedding_type(self) -> str:
        """"none" for toylens's no-position models, else TransformerLens's own setting."""
        extra = self.model_config.get("toylens") or {}
        return extra.get("positional_embedding_type") or self.model_config.get("positional_embedding_type", "standard")

    @functools.cached_property
    def task(self) -> Task:
        """The run's task, rebuilt from its saved config; RunError (one line) when it cannot be (its data file
        moved: pass ``data_path=``)."""
        from toylens.data import make_task

        check_data_file(self.path, self.config)
        try:
            return make_task(self.config.task)
        except (ValueError, TypeError) as e:  # the task checks its own settings and data: one line with its fix
            raise RunError(f"{self.path}: the run's task cannot be rebuilt: {_one_line(e)}") from None

    def batch(self, size: int, seed: int = ANALYSIS_SEED, device: str | torch.device = "cpu") -> Batch:
        """``size`` rows of the run's task, the same rows for the same seed on every device
        (sampled on the CPU, then moved)."""
        return self.task.eval_set(size, seed, "cpu").to(device)

    def check_step(self, step: int | None) -> int:
        """``step`` itself when it has a checkpoint, the last step for None; else RunError."""
        if step is None:
            return self.last_step
        if step not in self.steps:
            raise RunError(f"step={step}: {self.path} has no checkpoint at that step; "
                           f"choose one of {self.steps} (or step=null for the last)")
        return step

    def state(self, step: int | None = None) -> dict:
        """The optimizer/scheduler/RNG state saved with a checkpoint (``weights_only`` load)."""
        step = self.check_step(step)
        return self._pinned[step][1] if step in self._pinned else ck.load_state(self.path, step)

    def pin(self, step: int | None = None) -> int:
        """Read checkpoint ``step`` (default: the last) into memory now, so a training process that is
        still running and prunes it later cannot take it away; returns the step pinned. With
        ``step=None`` a checkpoint pruned between listing and reading is replaced by the newest one."""
        for _ in range(5):
            chosen = self.check_step(step)
            try:
                self._pinned[chosen] = (ck.load_weights(self.path, chosen), ck.load_state(self.path, chosen))
                return chosen
            except CheckpointError:
                if step is not None or ck.weights_path(self.path, chosen).exists():
                    raise
                self.steps[:] = ck.list_checkpoints(self.path)  # pruned meanwhile: take the newest again
                if not self.steps:
                    raise
        raise RunError(f"{self.path}: its checkpoints keep changing under the reader; try again")

    def wandb_id(self) -> str | None:
        """The wandb run id the training logged to (None when the run did not use wandb)."""
        if self.config.logger.name != "wandb":
            return None
        return self.state(self.last_step).get("wandb_id")

    def model(self, step: int | None = None, *, folded: bool = False, device: str | torch.device = "cpu",
              check_batch: Batch | None = None, tol: float = FOLD_TOL) -> HookedTransformer:
        """The model at ``step`` (default: the last checkpoint), in eval mode, with the task's tokenizer
        attached (``toylens.runs.tokenizer.attach_tokenizer``: ``model.to_tokens("a b c -> c")``).

        ``folded=True`` folds LayerNorm with ``toylens.model.fold.fold``, which compares the
        folded model's log-probs with the original's on ``check_batch`` (default: 256 rows of the
        task) and raises ``FoldCheckError`` when they differ by more than ``tol``.
        """
        step = self.check_step(step)
        model = self._build(device)
        if step in self._pinned:
            weights = {k: v.to(device) for k, v in self._pinned[step][0].items()}
        else:
            weights = ck.load_weights(self.path, step, device)
        wpath = ck.weights_path(self.path, step)
        try:
            model.load_state_dict(weights, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{wpath}: the weights do not fit model_config.json ({_one_line(e, 200)}); "
                                  f"the file was changed or belongs to another run") from None
        for key, value in model.named_parameters():  # buffers (e.g. the attention IGNORE value) may be inf
            if not bool(value.detach().isfinite().all()):
                raise CheckpointError(f"{wpath}: {key} holds NaN or inf; the file is corrupted or the run "
                                      f"diverged, use another step")
        if self.positional_embedding_type == "none" and bool(model.W_pos.detach().ne(0).any()):
            raise CheckpointError(f"{wpath}: positional embedding 'none' but W_pos is not zero; the file was "
                                  f"changed after training, use another step")
        model.eval()
        from toylens.runs.tokenizer import attach_tokenizer  # strings in: model.to_tokens("a b c -> c")

        if not folded:
            return attach_tokenizer(model, self.task)
        from toylens.model.fold import fold

        batch = check_batch if check_batch is not None else self.batch(FOLD_CHECK_ROWS, device=device)
        return attach_tokenizer(fold(model, batch, tol=tol).model, self.task)

    def _build(self, device: str | torch.device) -> HookedTransformer:
        from toylens.model.build import model_from_config_dict

        try:
            return model_from_config_dict(self.model_config, device=str(device))
        except Exception as e:  # unknown fields, wrong types, inconsistent sizes, ...
            raise RunError(f"{self.path / 'model_config.json'}: cannot build a HookedTransformer from it "
                           f"({_one_line(e, 200)}); restore the file written by toylens-train") from None


def load_run(path: str | Path, task_source: str | Path | None = None, data_path: str | Path | None = None) -> Run:
    """Read a run directory written by ``toylens-train`` (raises ``RunError``, one line, on any problem).

    A run of the user's own task loads that task's class again from the file or module it recorded
    (``task_source.json``); ``task_source``: a .py file to load it from instead (e.g. ``<run>/task_source.py``, the
    copy saved with the run). See ``toylens.runs.task_source``. ``data_path``: where the task's data file
    (``task.path``, e.g. a ``task=sequences`` file) is now, when it moved; its SHA-256 is checked against the one
    recorded with the run (a different file warns with both hashes)."""
    p = Path(path).expanduser().resolve()
    hint = "pass run=<the directory toylens-train printed>"
    if not p.exists():
        raise RunError(f"{p}: no such directory; {hint}")
    if not p.is_dir():
        raise RunError(f"{p}: a file, not a run directory; {hint}")
    cfg_path = p / ".hydra" / "config.yaml"
    if not cfg_path.is_file():
        raise RunError(f"{p}: not a toylens run directory (no .hydra/config.yaml); {hint}")
    from toylens.runs.task_source import TaskSourceError, restore_task

    try:
        restore_task(p, task_source)
    except TaskSourceError as e:
        raise RunError(str(e)) from None
    config = _read_train_config(cfg_path)
    if data_path is not None:
        config.task = with_data_path(config.task, data_path, p)
    check_data_file(p, config)
    model_config = _read_model_config(p / "model_config.json")
    steps = ck.list_checkpoints(p)
    if not steps:
        raise RunError(f"{p}: no checkpoints in {ck.CKPT_DIR}/ (the run stopped before its first checkpoint at "
                       f"step {config.train.checkpoint_every}); train it longer or resume it")
    try:
        metrics = ck.read_metrics(p)
    except CheckpointError as e:
        raise RunError(f"{_one_line(e)}; metrics.jsonl is garbled, restore or delete the bad line") from None
    return Run(path=p, config=config, model_config=model_config, steps=steps, metrics=metrics)


def with_data_path(task_cfg, data_path: str | Path, run_dir: Path):
    """``task_cfg`` reading its data from ``data_path`` (absolute) instead of the recorded ``task.path``; the recorded
    SHA-256 stays, so the task warns when the file there differs. RunError when the task reads no file."""
    import dataclasses

    if "path" not in {f.name for f in dataclasses.fields(task_cfg)}:
        raise RunError(f"data_path={data_path}: {run_dir}'s task {task_cfg.name} reads no data file (it has no "
                       f"task.path); drop data_path")
    full = Path(data_path).expanduser().absolute()
    if not full.is_file():
        raise RunError(f"data_path={data_path}: no such file {full}; give the data file's path (relative to where "
                       f"you run, or absolute)")
    return dataclasses.replace(task_cfg, path=str(full))


def check_data_file(run_dir: Path, config: TrainConfig) -> None:
    """RunError (one line) when the run's task reads a data file (``task.path``, recorded with its ``task.sha256``, as
    ``task=sequences`` does) that is not there any more: it names the recorded file and how to point at its new place.
    Other tasks' settings named ``path`` need not be files, so they are left to the task."""
    recorded = getattr(config.task, "path", None)
    if not (isinstance(recorded, str) and hasattr(config.task, "sha256")) or recorded in ("", "???"):
        return
    if Path(recorded).expanduser().is_file():
        return
    sha = getattr(config.task, "sha256", None)
    was = f" (sha256 {sha[:12]} when it trained)" if isinstance(sha, str) else ""
    raise RunError(f"task.path={recorded}: the data file of the run {run_dir} is gone{was}; put it back, or pass "
                   f"data_path=<where it is now> (toylens-analyze, toylens-train resume=, load_run(path, data_path=))")


def _read_train_config(path: Path) -> TrainConfig:
    from toylens.runs.config import ConfigError, TrainConfig, read_saved_config

    try:  # never resolved: toylens saved it resolved, so a ${...} in it stays literal text
        raw = read_saved_config(path)
    except (OSError, ValueError) as e:  # YAML syntax errors, not a mapping
        raise RunError(f"{path}: not a readable config ({_one_line(e, 200)}); restore the file toylens-train "
                       f"wrote") from None
    try:
        return TrainConfig.from_dict(raw)
    except (ConfigError, ValueError, TypeError) as e:
        raise RunError(f"{path}: {_one_line(e, 200)}; restore the file toylens-train wrote") from None


def _read_model_config(path: Path) -> dict[str, Any]:
    fix = "restore the model_config.json toylens-train wrote at the start of the run"
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{path}: missing; {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: not valid JSON ({_one_line(e, 120)}); {fix}") from None
    if not isinstance(d, dict):
        raise RunError(f"{path}: expected a JSON object of HookedTransformerConfig fields; {fix}")
    bad = [k for k in _REQUIRED_MODEL_KEYS
           if not isinstance(d.get(k), int) or isinstance(d.get(k), bool) or d[k] <= 0]
    if bad:
        raise RunError(f"{path}: {bad[0]}={d.get(bad[0])!r} is missing or not a positive integer; {fix}")
    return d
