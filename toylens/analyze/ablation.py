"""Ablate every hook: replace one activation at a time and rank hooks by how much the loss rises.

Seed 004's "Activation Replacement" loop, made exact-and-fast: for every hook point the forward
pass fires (plus every attention head on its own, labelled ``L{l}H{h}``), replace the activation
by its mean over a reference batch (kept per position, ``cache[hook].mean(0)``), by zero, or by
another row's activation (resample), and measure loss and accuracy on the evaluation batch.

    result = ablate_every_hook(model, batch, reference=other_batch, modes=("mean", "zero"))
    result.rows[:5]            # the five most damaging ablations
    result.to_csv(run_dir / "report" / "ablation.csv")

How it stays exact while being fast is in ``ablation_engine``; the tests compare it against the
naive loop (one ``run_with_hooks`` per hook on the whole batch).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from toylens._compat import HookedTransformer
from toylens.analyze import ablation_engine as engine
from toylens.analyze.ablation_engine import HEAD_LABEL, MODES
from toylens.analyze.result import Result
from toylens.data.base import Batch
from toylens.train.model import positional_embedding_type

__all__ = ["MODES", "AblationResult", "AblationRow", "SkippedHook", "ablate_every_hook"]


@dataclasses.dataclass
class AblationRow:
    hook: str  # hook name, or "L{l}H{h}" for one head's slice of blocks.{l}.attn.hook_z
    mode: str
    loss: float
    delta_loss: float  # loss - clean loss
    accuracy: float


@dataclasses.dataclass
class SkippedHook:
    hook: str
    reason: str


@dataclasses.dataclass
class AblationResult(Result):
    """Clean loss/accuracy and one row per (hook, mode), ranked by ``delta_loss`` (largest first).

    ``hooks`` lists the ablated labels in forward order; ``skipped`` every hook point (or head)
    that was not ablated, with the reason. A NaN loss (e.g. zeroing an LN ``hook_scale``) ranks first.
    """

    clean_loss: float
    clean_accuracy: float
    rows: list[AblationRow]
    skipped: list[SkippedHook]
    hooks: list[str]
    modes: list[str]
    n_rows: int
    n_reference_rows: int

    def row(self, hook: str, mode: str = "mean") -> AblationRow:
        for r in self.rows:
            if r.hook == hook and r.mode == mode:
                return r
        raise KeyError((hook, mode))

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write the ranked rows (hook, mode, loss, delta_loss, accuracy) atomically to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["hook", "mode", "loss", "delta_loss", "accuracy"])
                for r in self.rows:
                    w.writerow([r.hook, r.mode, repr(r.loss), repr(r.delta_loss), repr(r.accuracy)])
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def figures(self) -> dict:
        fig = go.Figure()
        for mode in self.modes:
            by_hook = {r.hook: r.delta_loss for r in self.rows if r.mode == mode}
            fig.add_trace(go.Bar(x=self.hooks, y=[by_hook[h] for h in self.hooks], name=mode))
        fig.update_layout(
            title=f"Loss increase when each activation is replaced (clean loss {self.clean_loss:.4g})",
            xaxis_title="hook", yaxis_title="Δ loss", barmode="group", legend_title="mode")
        fig.update_xaxes(type="category")
        return {"ablation/delta_loss": fig}


def _choose(model: HookedTransformer, order: list[str], hooks: Sequence[str] | None,
            per_head: bool) -> tuple[list[str], list[SkippedHook]]:
    """Labels to ablate (forward order, heads after their hook_z) and everything not ablated, with why."""
    cfg = model.cfg
    skipped: list[SkippedHook] = []
    for name in model.hook_dict:
        if name in order:
            continue
        if name.endswith("attn.hook_result"):
            skipped.append(SkippedHook(name, "per-head result is not computed: cfg.use_attn_result is False"))
        else:
            skipped.append(SkippedHook(name, "does not fire in this model's forward pass"))

    default: list[str] = []
    for name in order:
        if name == "hook_pos_embed" and positional_embedding_type(model) == "none":
            skipped.append(SkippedHook(name, "positional embedding 'none': W_pos is zero and frozen"))
            continue
        default.append(name)
        if name.endswith("attn.hook_z"):
            layer = int(name.split(".")[1])
            for h in range(cfg.n_heads):
                if cfg.n_heads == 1:
                    skipped.append(SkippedHook(f"L{layer}H{h}", f"n_heads == 1: the same as {name}"))
                elif not per_head:
                    skipped.append(SkippedHook(f"L{layer}H{h}", "per_head=False"))
                else:
                    default.append(f"L{layer}H{h}")
    if hooks is None:
        return default, skipped

    def valid(label: str) -> bool:
        m = HEAD_LABEL.fullmatch(label)
        if m:
            return int(m["layer"]) < cfg.n_layers and int(m["head"]) < cfg.n_heads
        return label in order

    bad = [h for h in hooks if not valid(h)]
    if bad:
        raise ValueError(f"cannot ablate {bad}: not a hook point that fires nor a head label L<layer>H<head>; "
                         f"hook points that fire: {order}")
    wanted = set(hooks)
    rank = {name: i for i, name in enumerate(order)}

    def position(label: str) -> tuple[int, int]:
        m = HEAD_LABEL.fullmatch(label)
        if m:
            return rank[f"blocks.{m['layer']}.attn.hook_z"], 1 + int(m["head"])
        return rank[label], 0

    chosen = sorted(wanted, key=position)
    skipped += [SkippedHook(h, "not selected by hooks=") for h in default if h not in wanted]
    return chosen, skipped


def ablate_every_hook(
    model: HookedTransformer,
    batch: Batch,
    *,
    reference: Batch | None = None,
    modes: Sequence[str] = ("mean",),
    hooks: Sequence[str] | None = None,
    per_head: bool = True,
    chunk_rows: int = 250,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> AblationResult:
    """Replace each hook's activation in turn and measure loss and accuracy on ``batch``.

    Args:
        model: any HookedTransformer (toylens's positional "none" is recognised).
        batch: the evaluation batch; loss is the mean cross-entropy of ``targets`` over
            ``loss_mask``, accuracy the fraction of those positions whose argmax is the target.
        reference: the batch whose activations define the replacements (default: ``batch``).
        modes: any of "mean" (per-position mean over the reference rows), "zero", "resample"
            (each row gets the activation of a random other reference row; one draw for all hooks).
        hooks: hook names and/or head labels ``L{l}H{h}`` to ablate; default every hook point the
            forward pass fires, except ``hook_pos_embed`` under positional "none", plus every head.
        per_head: with ``hooks=None``, also ablate each head alone (``hook_z[:, :, h]``) when n_heads > 1.
        chunk_rows: rows per forward pass (memory and speed; the results do not depend on it).
        generator: randomness of "resample" (default: seeded with 0, so results are reproducible).
        progress: show a tqdm bar over chunks.
    """
    modes = list(dict.fromkeys(modes))
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"unknown ablation modes {unknown or modes}; choose from {MODES}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows} must be at least 1")
    device = model.cfg.device
    same_batch = reference is None or reference is batch
    batch = batch.to(device)
    ref = batch if same_batch else reference.to(device)

    with torch.inference_mode(), engine.keep_freed_memory():
        order = engine.firing_order(model, batch.tokens)
        labels, skipped = _choose(model, order, hooks, per_head)
        fast = engine.fast_path_ok(model)
        jobs = engine.plan_jobs(model, labels, order, fast)
        names = list(dict.fromkeys(j.hook for j in jobs))

        means = None
        if "mean" in modes:
            acc = engine.MeanAccumulator(names)
            for rows in engine.chunks(len(ref), chunk_rows):
                acc.add_chunk(model, ref.tokens[rows])
            means = acc.means(model.cfg.dtype)
        resample_index = None
        if "resample" in modes:
            gen = generator if generator is not None else torch.Generator().manual_seed(0)
            resample_index = engine.resample_rows(len(batch), len(ref), same_batch, gen).to(device)

        clean_names = list(dict.fromkeys(n for j in jobs for n in j.clean))
        clean = engine.Totals()
        totals = {(j.label, m): engine.Totals() for j in jobs for m in modes}
        for rows in tqdm(list(engine.chunks(len(batch), chunk_rows)), desc="ablate_every_hook",
                         disable=not progress):
            chunk, nll, correct = engine.clean_chunk(model, batch[rows], clean_names)
            n = int(chunk.batch.loss_mask.sum())
            clean.add(nll, correct, n)
            resampled = None
            if resample_index is not None:
                resampled = engine.activations(model, ref.tokens[resample_index[rows]], names)
            for job in jobs:
                for mode in modes:
                    new_value = engine.replacement_fn(mode, job, means, resampled)
                    nll, correct = engine.run_patched(model, chunk, job, new_value, broadcast=fast)
                    totals[(job.label, mode)].add(nll, correct, n)
            del chunk, resampled

    clean_loss = clean.loss
    rows_out = [AblationRow(label, mode, t.loss, t.loss - clean_loss, t.accuracy)
                for (label, mode), t in totals.items()]
    rows_out.sort(key=lambda r: -math.inf if math.isnan(r.delta_loss) else -r.delta_loss)
    return AblationResult(clean_loss=clean_loss, clean_accuracy=clean.accuracy, rows=rows_out,
                          skipped=skipped, hooks=labels, modes=modes, n_rows=len(batch),
                          n_reference_rows=len(ref))
