"""Training dynamics: chosen analyses (attention, circuits, ablation) on every saved checkpoint of one run, against
the step. Details: docs/analyses.md, "Training dynamics"."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from toylens._compat import HookedTransformer
from toylens.analyze import plots
from toylens.data.base import Batch
from toylens.result import Result
from toylens.runs.run import FOLD_CHECK_ROWS, Run

DYNAMICS_ANALYSES = ("attention", "circuits", "ablation")  # eval loss and accuracy are always measured
FORMED_AT = 0.5  # a head "has formed" once it has made this fraction of its rise (DynamicsResult.formed_at)


@dataclass
class DynamicsResult(Result):
    """Analyses per checkpoint, stacked along a leading ``step`` axis (``steps`` ascending).

    ``head_scores``: score name -> ``[step, layer, head_index]`` (empty without "attention");
    ``copying_score``: ``[step, layer, head_index]`` (None without "circuits");
    ``ablation_delta_loss``: ``[step, hook]`` for ``ablation_hooks`` (None without "ablation").
    """

    steps: list[int]
    loss: Float[Tensor, " step"]
    accuracy: Float[Tensor, " step"]
    head_labels: list[str]
    head_scores: dict[str, Float[Tensor, "step layer head_index"]] = field(default_factory=dict)
    copying_score: Float[Tensor, "step layer head_index"] | None = None
    fold_max_abs_logprob_diff: list[float] | None = None
    ablation_hooks: list[str] = field(default_factory=list)
    ablation_delta_loss: Float[Tensor, "step hook"] | None = None
    ablation_mode: str = "mean"
    n_rows: int = 0
    n_reference_rows: int = 0
    per_checkpoint: dict[str, list] = field(default_factory=dict)  # name -> one value (or exception) per step

    def formed_at(self, score: str = "previous_token", fraction: float = FORMED_AT) -> tuple[str, int] | None:
        """(head, step): the head whose ``score`` rises most from the first checkpoint to its maximum,
        and the first checkpoint at which it has made ``fraction`` of that rise. Relative, because
        what a solved model's score reaches depends on the task (seed 004's model solves the task
        with a previous-token score of ~0.28). None without the score or when no head rises."""
        s = self.head_scores.get(score)
        if s is None:
            return None
        flat = torch.nan_to_num(s.reshape(len(self.steps), -1).double(), nan=0.0)
        rise = flat.max(0).values - flat[0]
        head = int(rise.argmax())
        if float(rise[head]) <= 0:
            return None
        target = float(flat[0, head] + fraction * rise[head])
        i = next(i for i in range(len(self.steps)) if float(flat[i, head]) >= target)
        return self.head_labels[head], self.steps[i]

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.pop("per_checkpoint")  # the caller's own results (report.dynamics turns them into JSON)
        n = len(self.steps)
        d["scores_by_head"] = {name: {h: s.reshape(n, -1)[:, i].tolist() for i, h in enumerate(self.head_labels)}
                               for name, s in self.head_scores.items()}
        if self.copying_score is not None:
            d["copying_score_by_head"] = {h: self.copying_score.reshape(n, -1)[:, i].tolist()
                                          for i, h in enumerate(self.head_labels)}
        if self.ablation_delta_loss is not None:
            d["ablation_by_hook"] = {h: self.ablation_delta_loss[:, i].tolist()
                                     for i, h in enumerate(self.ablation_hooks)}
        formed = self.formed_at()
        d["previous_token_formed_at"] = {"head": formed[0], "step": formed[1]} if formed else None
        return d

    def figures(self) -> dict:
        figs = {}
        x = self.steps
        fig = go.Figure(go.Scatter(x=x, y=self.loss.tolist(), mode="lines+markers", name="loss"))
        fig.update_layout(title="Loss on the analysis batch at each checkpoint", xaxis_title="step", yaxis_title="loss")
        if bool((self.loss > 0).all()):
            fig.update_yaxes(type="log")
        figs["dynamics/loss"] = fig
        fig = go.Figure(go.Scatter(x=x, y=self.accuracy.tolist(), mode="lines+markers", name="accuracy"))
        fig.update_layout(title="Accuracy at each checkpoint", xaxis_title="step", yaxis_title="accuracy")
        figs["dynamics/accuracy"] = fig
        n = len(x)
        for name, s in self.head_scores.items():
            figs[f"dynamics/{name}"] = plots.line(s.reshape(n, -1).T, labels=self.head_labels, x=x,
                                                  title=f"{name} score of each head vs step", xaxis="step",
                                                  yaxis=f"{name} score")
        if self.copying_score is not None:
            figs["dynamics/copying_score"] = plots.line(self.copying_score.reshape(n, -1).T, labels=self.head_labels,
                                                        x=x, title="OV copying score of each head vs step",
                                                        xaxis="step", yaxis="copying score")
        if self.ablation_delta_loss is not None:
            d = self.ablation_delta_loss
            fig = plots.heatmap(d.T, x_labels=[str(s) for s in x], y_labels=self.ablation_hooks, diverging=False,
                                title=f"{self.ablation_mode}-ablation Δ loss per hook and step", xaxis="step",
                                yaxis="hook")
            figs["dynamics/ablation"] = fig
            final = torch.nan_to_num(d[-1], nan=math.inf)
            top = [int(i) for i in final.argsort(descending=True)[:8]]
            figs["dynamics/ablation_top"] = plots.line(d[:, top].T, labels=[self.ablation_hooks[i] for i in top], x=x,
                                                       title="Δ loss of the 8 hooks that matter most at the end",
                                                       xaxis="step", yaxis="Δ loss")
        return figs


@torch.no_grad()
def batch_loss(model: HookedTransformer, batch: Batch, task=None, chunk_size: int = 250) -> tuple[float, float]:
    """Masked cross-entropy of ``batch.targets`` (mean over ``loss_mask``) and ``task.accuracy``
    (row-weighted over chunks, as the training loop's eval/accuracy; NaN without a task)."""
    nll = torch.zeros((), dtype=torch.float64)
    acc = torch.zeros((), dtype=torch.float64)
    for i in range(0, len(batch), chunk_size):
        part = batch[i:i + chunk_size].to(model.cfg.device)
        logits = model(part.tokens).float()
        tgt = part.targets.masked_fill(~part.loss_mask, -100)
        nll += F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100, reduction="sum").double().cpu()
        if task is not None:
            acc += task.accuracy(logits, part).double().cpu() * len(part)
    n = int(batch.loss_mask.sum())
    return float(nll / n) if n else math.nan, float(acc / len(batch)) if task is not None else math.nan


def checkpoint_dynamics(run: Run, batch: Batch, *, reference: Batch | None = None, steps: Sequence[int] | None = None,
                        analyses: Sequence[str] = DYNAMICS_ANALYSES, per_head: bool = True, chunk_size: int = 250,
                        ablation_chunk_rows: int = 250, device: str = "cpu", progress: bool = True,
                        per_checkpoint: Mapping[str, Callable] | None = None) -> DynamicsResult:
    """Run ``analyses`` (any of attention, circuits, ablation; loss always) on each checkpoint of ``run``.

    ``batch`` is the evaluation batch every analysis uses; ``reference`` defines the ablation means
    (default: ``batch``); ``steps`` a subset of ``run.steps`` (default: all, ascending). ``per_checkpoint``: more
    functions ``f(model, step)`` called on each checkpoint's model (the user's analyses); what each returns, or the
    exception it raised, is kept per step in ``per_checkpoint``.
    """
    from toylens.analyze.ablation import ablate_every_hook
    from toylens.analyze.attention import SCORE_NAMES, attention_patterns
    from toylens.analyze.qkov import copying_scores, full_ov_circuit
    from toylens.model.fold import fold

    bad = [a for a in analyses if a not in DYNAMICS_ANALYSES]
    if bad:
        raise ValueError(f"analyses: {bad[0]!r} is not a dynamics analysis; "
                         f"choose from {', '.join(DYNAMICS_ANALYSES)}")
    steps = sorted(run.check_step(s) for s in (run.steps if steps is None else steps))
    if not steps:
        raise ValueError("steps: empty; pass checkpoint steps of the run or None for all")
    batch = batch.to(device)
    reference = batch if reference is None else reference.to(device)
    losses, accs, scores, copying, fold_diffs, deltas = [], [], {n: [] for n in SCORE_NAMES}, [], [], []
    hooks: list[str] = []
    labels: list[str] = []
    extra: dict[str, list] = {name: [] for name in per_checkpoint or {}}
    for step in tqdm(steps, disable=not progress, desc="checkpoints"):
        model = run.model(step, device=device)
        for name, fn in (per_checkpoint or {}).items():
            try:
                extra[name].append(fn(model, step))
            except Exception as e:  # one failing step of one analysis must not lose the others
                extra[name].append(e)
        labels = model.all_head_labels()
        loss, acc = batch_loss(model, batch, run.task, chunk_size)
        losses.append(loss)
        accs.append(acc)
        if "attention" in analyses:
            res = attention_patterns(model, batch, chunk_size=chunk_size)
            for n in SCORE_NAMES:
                scores[n].append(res.scores[n])
        if "circuits" in analyses:
            folded = fold(model, batch[:FOLD_CHECK_ROWS], tol=math.inf, chunk_size=chunk_size)
            fold_diffs.append(folded.max_abs_logprob_diff)
            copying.append(copying_scores(full_ov_circuit(folded.model)).cpu())
        if "ablation" in analyses:
            res = ablate_every_hook(model, batch, reference=reference, modes=["mean"], per_head=per_head,
                                    chunk_rows=ablation_chunk_rows, progress=False)
            by_hook = {r.hook: r.delta_loss for r in res.rows}
            hooks = res.hooks
            deltas.append(torch.tensor([by_hook[h] for h in hooks]))
    return DynamicsResult(
        steps=steps, loss=torch.tensor(losses), accuracy=torch.tensor(accs), head_labels=labels,
        head_scores={n: torch.stack(v) for n, v in scores.items() if v},
        copying_score=torch.stack(copying) if copying else None,
        fold_max_abs_logprob_diff=fold_diffs or None,
        ablation_hooks=hooks if deltas else [],
        ablation_delta_loss=torch.stack(deltas) if deltas else None,
        n_rows=len(batch), n_reference_rows=len(reference) if "ablation" in analyses else 0, per_checkpoint=extra,
    )
