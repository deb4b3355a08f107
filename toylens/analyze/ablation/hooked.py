"""Ablation runs through a HookedTransformer's own hook points: any architecture, exactly (the models the
fused engine does not compute, or whose hook points differ from the plain architecture's)."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator, Sequence

from torch import Tensor

from toylens._compat import HookedTransformer
from toylens.analyze.ablation.plan import (
    MODES,
    Job,
    evaluate_jobs,
    masked_positions,
    nll_and_correct,
)
from toylens.data.base import Batch


# --- replacement values (the modes) --------------------------------------------------------------
def replacement_fn(mode: str, job: Job, means: dict[str, Tensor] | None,
                   resampled: dict[str, Tensor] | None) -> Callable[[Tensor], Tensor]:
    """f(clean activation) -> new activation for ``job.hook``: a single row when it is batch-constant."""
    if mode == "mean":
        assert means is not None
        mean = means[job.hook]
        return lambda act: mean.clone()  # clone: downstream ops must never write into our means
    if mode == "zero":
        return lambda act: act.new_zeros((1, *act.shape[1:]))
    if mode == "resample":
        assert resampled is not None
        ref = resampled[job.hook]
        return lambda act: ref
    raise ValueError(f"unknown ablation mode {mode!r}; choose from {MODES}")


# --- hooks: one dispatcher per hook point, patches per thread ------------------------------------
HookFn = Callable[[Tensor, object], "Tensor | None"]


class Patches:
    """A TransformerLens hook function that applies whatever the *calling thread* has set.

    Installed once on every hook point, it lets worker threads run different ablations through
    one model at the same time (``model.hooks`` would add each thread's hooks to every thread's run).
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def __call__(self, act: Tensor, hook) -> Tensor | None:
        fns = getattr(self._local, "fns", None)
        fn = fns.get(hook.name) if fns else None
        return None if fn is None else fn(act, hook)

    @contextlib.contextmanager
    def using(self, fns: dict[str, HookFn]) -> Iterator[None]:
        self._local.fns = fns
        try:
            yield
        finally:
            self._local.fns = None


def _grab_into(store: dict[str, Tensor]) -> HookFn:
    def hook(act: Tensor, hook) -> None:
        store[hook.name] = act  # the last call wins, as in run_with_cache
    return hook


def _put_back(value: Tensor) -> HookFn:
    return lambda act, hook: value


def _one_row(act: Tensor, hook) -> Tensor:
    return act[:1]


def _select(positions: slice | Tensor) -> HookFn:
    return lambda act, hook: act[:, positions]


# --- the work on one chunk -----------------------------------------------------------------------
@dataclasses.dataclass
class Chunk:
    """One chunk of the evaluation batch plus its clean values needed to resume runs."""

    batch: Batch
    positions: slice | Tensor  # positions where some row is loss-masked (logits computed only there)
    resid_pre: list[Tensor]  # clean input of every block, and at index n_layers the final residual
    clean: dict[str, Tensor]  # other clean hook values put back by jobs (hook_resid_mid)


class Runner:
    """Runs jobs on chunks of a batch through ``model`` (with ``patches`` installed on its hook points)."""

    def __init__(self, model: HookedTransformer, jobs: Sequence[Job], modes: Sequence[str],
                 patches: Patches, broadcast: bool):
        self.model, self.jobs, self.modes = model, list(jobs), list(modes)
        self.patches, self.broadcast = patches, broadcast
        # hook points whose means / other-row values are needed (aliased jobs reuse another's result)
        self.names = list(dict.fromkeys(j.hook for j in jobs if j.same_as is None))
        self.clean_names = list(dict.fromkeys(n for j in jobs for n in j.clean))
        self.n_layers = model.cfg.n_layers

    def _forward(self, tokens: Tensor, fns: dict[str, HookFn], names: Sequence[str]) -> None:
        needs_logits = any(n.startswith("unembed.") for n in names)
        with self.patches.using(fns):
            self.model(tokens, return_type="logits" if needs_logits else None)

    def sums(self, tokens: Tensor) -> dict[str, Tensor]:
        """Per-position sums over the rows of ``tokens`` of every replaced hook's activation."""
        out: dict[str, Tensor] = {}

        def add(act: Tensor, hook) -> None:
            out[hook.name] = act.sum(0)  # the last call wins, as in run_with_cache

        self._forward(tokens, dict.fromkeys(self.names, add), self.names)
        return {name: s.double() for name, s in out.items()}

    def activations(self, tokens: Tensor) -> dict[str, Tensor]:
        """Clean activations of every replaced hook (for resample)."""
        store: dict[str, Tensor] = {}
        self._forward(tokens, dict.fromkeys(self.names, _grab_into(store)), self.names)
        return store

    def clean(self, batch: Batch) -> tuple[Chunk, Tensor, Tensor]:
        """Clean pass over one chunk: the values runs resume from, and the clean NLL / correct counts."""
        store: dict[str, Tensor] = {}
        resid_pre = [f"blocks.{layer}.hook_resid_pre" for layer in range(self.n_layers)]
        positions = masked_positions(batch.loss_mask)
        fns = dict.fromkeys(resid_pre + self.clean_names, _grab_into(store))
        fns["unembed.hook_in"] = _select(positions)
        with self.patches.using(fns):
            final = self.model(batch.tokens, stop_at_layer=self.n_layers)
            logits = self.model(final, start_at_layer=self.n_layers)
        nll, correct = nll_and_correct(logits, batch, positions)
        chunk = Chunk(batch, positions, [store[n] for n in resid_pre] + [final],
                      {n: store[n] for n in self.clean_names})
        return chunk, nll, correct

    def run(self, chunk: Chunk, job: Job, new_value: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """THE primitive: run ``chunk`` from ``job``'s block with ``job.hook`` replaced by ``new_value(clean)``.

        Returns (summed NLL, correct argmaxes) over the chunk's loss mask.
        """
        head, broadcast = job.head, self.broadcast

        def patch(act: Tensor, hook) -> Tensor:
            new = new_value(act)
            if head is not None:
                out = act.clone()
                out[:, :, head] = new[:, :, head]
                return out
            if new.shape[0] != act.shape[0] and not broadcast:
                new = new.expand(act.shape).contiguous()
            return new

        fns: dict[str, HookFn] = {job.hook: patch}
        fns.update(dict.fromkeys(job.one_row, _one_row))
        fns.update({n: _put_back(chunk.clean[n]) for n in job.clean})
        at_unembed = job.hook.startswith("unembed.")
        if not at_unembed:
            fns["unembed.hook_in"] = _select(chunk.positions)
        x = chunk.batch.tokens if job.start is None else chunk.resid_pre[job.start]
        if job.one_row_input:
            x = x[:1]
        with self.patches.using(fns):
            logits = self.model(x) if job.start is None else self.model(x, start_at_layer=job.start)
        if at_unembed:
            logits = logits[:, chunk.positions]
        return nll_and_correct(logits, chunk.batch, chunk.positions)

    def evaluate(self, batch: Batch, means: dict[str, Tensor] | None,
                 resample_tokens: Tensor | None) -> Tensor:
        chunk, nll, correct = self.clean(batch)
        resampled = self.activations(resample_tokens) if resample_tokens is not None else None
        return evaluate_jobs(self.jobs, self.modes, batch, nll, correct,
                             lambda job, mode: self.run(chunk, job, replacement_fn(mode, job, means, resampled)))
