"""The Task contract: a synthetic task is data, not a special case in the training loop.

A task samples ``Batch(tokens, targets, loss_mask)``; the loss is cross-entropy of ``targets``
where ``loss_mask`` is true. "Predict the previous token", "answer only after the separator" and
"next token" therefore differ only in what the generator writes into those three tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no truth value; batches compare by identity
class Batch:
    tokens: Int[Tensor, "batch pos"]
    targets: Int[Tensor, "batch pos"]
    loss_mask: Bool[Tensor, "batch pos"]

    def __post_init__(self) -> None:
        shapes = {self.tokens.shape, self.targets.shape, self.loss_mask.shape}
        if len(shapes) != 1 or self.tokens.ndim != 2:
            raise ValueError(f"Batch tensors must share one [batch, pos] shape, got {shapes}")
        if self.loss_mask.dtype != torch.bool:
            raise ValueError(f"Batch.loss_mask must be a bool tensor, got {self.loss_mask.dtype}; use mask.bool()")
        devices = {self.tokens.device, self.targets.device, self.loss_mask.device}
        if len(devices) != 1:
            raise ValueError(f"Batch tensors are on several devices {sorted(map(str, devices))}; move them to one")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.tokens.to(device), self.targets.to(device), self.loss_mask.to(device))

    def __getitem__(self, rows: slice | Tensor) -> Batch:
        """Rows of the batch (a slice or an index tensor), e.g. ``batch[:250]`` for chunked work."""
        return Batch(self.tokens[rows], self.targets[rows], self.loss_mask[rows])


@dataclass
class TaskConfig:
    """Base of every task's config dataclass (registered with Hydra's ConfigStore as ``task/<name>_schema``)."""

    name: str = "???"


class Task:
    """A synthetic task. Subclasses set ``name``/``config_cls`` and implement ``sample``.

    Instances expose ``d_vocab`` (vocabulary size the model needs), ``seq_len`` (tokens per
    sequence, the model's minimum ``n_ctx``) and ``token_names`` (one label per token id, for plots).
    """

    name: ClassVar[str]  # default: the class name in lower case
    config_cls: ClassVar[type[TaskConfig]] = TaskConfig  # default: no settings

    def __init_subclass__(cls, **kw) -> None:
        super().__init_subclass__(**kw)
        if not isinstance(cls.__dict__.get("name"), str) and not isinstance(getattr(cls, "name", None), str):
            cls.name = cls.__name__.lower()

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg

    # --- the contract -------------------------------------------------------------------------
    @property
    def d_vocab(self) -> int:
        raise NotImplementedError

    @property
    def seq_len(self) -> int:
        raise NotImplementedError

    @property
    def token_names(self) -> list[str]:
        raise NotImplementedError

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """A batch generated on ``generator.device`` using only ``generator`` for randomness."""
        raise NotImplementedError

    def corrupt(self, batch: Batch, generator: torch.Generator) -> Batch:
        """Corrupted counterparts of ``batch`` (same shape) for activation patching."""
        raise NotImplementedError(f"task {self.name!r} offers no corrupt()")

    def corrupt_unavailable(self) -> str | None:
        """Why this task object offers no pairs although its class defines ``corrupt`` (e.g. a file of sequences
        with one distinct training row): a one-line reason, or None when ``corrupt`` works."""
        return None

    def accuracy(self, logits: Float[Tensor, "batch pos d_vocab"], batch: Batch) -> Tensor:
        """Fraction of loss-masked positions whose argmax logit is the target (a 0-dim tensor)."""
        correct = (logits.argmax(-1) == batch.targets) & batch.loss_mask
        return correct.sum() / batch.loss_mask.sum().clamp(min=1)

    # --- helpers shared by all tasks ----------------------------------------------------------
    def train_batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        """What the training loop trains on each step: ``sample`` unless the task says otherwise
        (modular_add's full batch)."""
        return self.sample(batch_size, generator)

    def eval_set(self, size: int, seed: int, device: torch.device | str = "cpu") -> Batch:
        """The fixed held-out set: the same ``seed`` always gives the same batch. Tasks with a fixed
        split (modular_add, brackets, copy/reverse/sort) draw it from the held-out side only."""
        gen = torch.Generator(device=device).manual_seed(seed)
        return self.sample(size, gen)

    def train_set(self, device: torch.device | str = "cpu") -> Batch | None:
        """Every training example, when the task trains on a fixed finite set (modular_add); else None.
        The loop evaluates it beside the held-out set (``eval/train_loss``, ``eval/train_accuracy``)."""
        return None

    def pinned_config(self) -> TaskConfig:
        """The config saved with a run, so the run rebuilds this task from any directory: relative file paths made
        absolute, data files' hashes filled in (the sequences task); default: the config as given."""
        return self.cfg

    def __repr__(self) -> str:
        """``Majority(n_bits=5) from /abs/majority.py:Majority``; a built-in: ``PrevToken(d_vocab=20, seq_len=12)``
        (what ``print(run.task)`` shows: its settings and where its code came from, not an object address)."""
        settings = ", ".join(f"{f.name}={getattr(self.cfg, f.name)!r}" for f in fields(self.cfg) if f.name != "name")
        ref = getattr(self.cfg, "name", None)
        builtin = TASKS.get(ref) is type(self) and type(self).__module__.startswith("toylens.")
        return f"{type(self).__name__}({settings})" + ("" if builtin or not ref else f" from {ref}")

    def describe(self) -> dict:
        return {
            "name": self.name,
            "d_vocab": self.d_vocab,
            "seq_len": self.seq_len,
            **{f.name: getattr(self.cfg, f.name) for f in fields(self.cfg) if f.name != "name"},
        }


TASKS: dict[str, type[Task]] = {}  # by name: the built-ins, and tasks registered with @register_task


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: add a Task subclass to the registry under ``cls.name`` (the built-ins use it; so may a
    user's module, though ``task=module:Class`` needs no decorator). Lookups: ``toylens.data.registry``."""
    old = TASKS.get(cls.name)
    if old is not None and old is not cls and old.__module__ != cls.__module__:  # the same module re-run: replaced
        raise ValueError(f"task {cls.name!r} registered twice ({TASKS[cls.name].__module__} and {cls.__module__}); "
                         f"rename one")
    TASKS[cls.name] = cls
    return cls
