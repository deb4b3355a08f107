"""Ablate every hook: replace one activation at a time (mean, zero or resample) and rank hooks by the loss.

    result = ablate_every_hook(model, batch, reference=other_batch, modes=("mean", "zero"))

Why it is exact and fast: docs/analyses.md, "Every-hook ablation"; the tests hold it to the naive loop."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go
import torch

from toylens._compat import HookedTransformer
from toylens.analyze.ablation import fused, plan
from toylens.analyze.ablation import hooked as hooked_runner
from toylens.analyze.ablation.plan import HEAD_LABEL, MODES
from toylens.data.base import Batch
from toylens.model.build import positional_embedding_type
from toylens.model.eligibility import fast_path_reason
from toylens.result import Result

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
    engine: str = "hooked"  # "fused" (ablation_fused) or "hooked (<why the fused path does not apply>)"

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
    chunk_rows: int = 100,
    generator: torch.Generator | None = None,
    progress: bool = True,
    workers: int | None = None,
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
        workers: chunks in flight at once, each in its own thread with torch's threads divided
            among them (default: 2 on CPU, 1 on an accelerator; torch's thread count is restored
            afterwards). Two workers bound memory (~2 chunk working sets) and keep a small CPU busy
            without OpenMP barriers in every small op; ``workers=1`` uses the least memory.
    """
    modes = list(dict.fromkeys(modes))
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"unknown ablation modes {unknown or modes}; choose from {MODES}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows} must be at least 1")
    device = model.cfg.device
    threads = torch.get_num_threads()
    if workers is None:  # two chunks in flight on CPU; an accelerator runs one stream anyway
        workers = min(2, threads) if torch.device(device).type == "cpu" else 1
    same_batch = reference is None or reference is batch
    batch = batch.to(device)
    ref = batch if same_batch else reference.to(device)

    order = plan.firing_order(model, batch.tokens)
    labels, skipped = _choose(model, order, hooks, per_head)
    engine_why = fast_path_reason(model)
    fast = plan.one_row_tricks_ok(model, engine_why)
    jobs = plan.plan_jobs(model, labels, order, fast)
    resample_index = None
    if "resample" in modes:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        resample_index = plan.resample_rows(len(batch), len(ref), same_batch, gen).to(device)

    plain_hooks = order == fused.hook_names(model)
    why_not_fused = engine_why or (None if plain_hooks else "hook points differ from the plain architecture's")
    if why_not_fused is None:
        runner = fused.FusedRunner(model, jobs, modes, batch.tokens)
        hooks_on = contextlib.nullcontext()
    else:
        patches = hooked_runner.Patches()
        runner = hooked_runner.Runner(model, jobs, modes, patches, broadcast=fast)
        hooks_on = model.hooks(fwd_hooks=[(name, patches) for name in order])
    with torch.inference_mode(), plan.torch_threads(max(1, threads // workers)), hooks_on:
        means = None
        if "mean" in modes:
            sums = plan.map_chunks(lambda rows: runner.sums(ref.tokens[rows]), len(ref), chunk_rows,
                                     workers, "ablation: reference means", progress)
            means = {name: (sum(s[name] for s in sums) / len(ref)).to(model.cfg.dtype)[None]
                     for name in runner.names}

        def evaluate(rows: slice):
            resample_tokens = None if resample_index is None else ref.tokens[resample_index[rows]]
            return runner.evaluate(batch[rows], means, resample_tokens)

        per_chunk = plan.map_chunks(evaluate, len(batch), chunk_rows, workers, "ablate_every_hook", progress)
    totals = sum(per_chunk[1:], per_chunk[0]).tolist()  # in chunk order: deterministic

    def loss_acc(row: list[float]) -> tuple[float, float]:
        nll, correct, n = row
        return (nll / n, correct / n) if n else (math.nan, math.nan)

    clean_loss, clean_accuracy = loss_acc(totals[0])
    rows_out = []
    for i, (job, mode) in enumerate((j, m) for j in jobs for m in modes):
        loss, acc = loss_acc(totals[1 + i])
        rows_out.append(AblationRow(job.label, mode, loss, loss - clean_loss, acc))
    rows_out.sort(key=lambda r: -math.inf if math.isnan(r.delta_loss) else -r.delta_loss)
    return AblationResult(clean_loss=clean_loss, clean_accuracy=clean_accuracy, rows=rows_out,
                          skipped=skipped, hooks=labels, modes=modes, n_rows=len(batch),
                          n_reference_rows=len(ref),
                          engine="fused" if why_not_fused is None else f"hooked ({why_not_fused})")
