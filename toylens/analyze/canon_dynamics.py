"""The two canon findings against the training step: the induction-head phase change (Olsson et al. 2022) and the
three phases of grokking (Nanda et al. 2023). How they are located: docs/analyses.md, "Canon dynamics"."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import plotly.graph_objects as go
import torch
from torch import Tensor
from tqdm.auto import tqdm

from toylens.analyze import plots
from toylens.result import Result
from toylens.runs.run import ANALYSIS_SEED, FOLD_CHECK_ROWS, Run

MEMORISED_ACC = 0.99  # memorisation ends at the first checkpoint with this train accuracy
CLEANUP_FROM, CLEANUP_TO = 0.1, 0.9  # clean-up: log test loss from 10% to 90% of its fall from the peak
MIN_FALL = 1.0  # a fall of log test loss smaller than this (a factor e) is no clean-up


def steepest_rise(steps: Sequence[int], values: Sequence[float]) -> dict | None:
    """The consecutive checkpoints between which ``values`` rises fastest per step (None: never rises)."""
    rates = [((values[i + 1] - values[i]) / max(1, steps[i + 1] - steps[i]), i) for i in range(len(steps) - 1)]
    if not rates or max(rates)[0] <= 0:
        return None
    rate, i = max(rates)
    return {"from_step": steps[i], "to_step": steps[i + 1], "step": (steps[i] + steps[i + 1]) / 2,
            "rise": values[i + 1] - values[i], "rate_per_step": rate}


def _mark(fig: go.Figure, x, text: str) -> None:
    fig.add_vline(x=x, line_dash="dash", line_color="crimson", annotation_text=text, annotation_position="top")


@dataclass
class InductionDynamics(Result):
    steps: list[int]
    head_labels: list[str]
    scores: dict[str, Tensor]  # name -> [step, layer, head_index]
    icl_score: Tensor  # [step]
    repeated_half_loss: Tensor
    first_half_loss: Tensor
    k_composition: Tensor  # [step]: the last checkpoint's circuit pair
    circuit: dict = field(default_factory=dict)  # the last checkpoint's
    phase_change: dict | None = None

    def best_induction(self) -> Tensor:
        """Highest induction score among heads of layer >= 1, per step."""
        s = torch.nan_to_num(self.scores["induction"][:, 1:], nan=0.0)
        return s.reshape(len(self.steps), -1).max(-1).values

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["best_induction_score"] = self.best_induction().tolist()
        return d

    def figures(self) -> dict:
        x, n = self.steps, len(self.steps)
        figs = {}
        for name in ("induction", "previous_token"):
            fig = plots.line(self.scores[name].reshape(n, -1).T, labels=self.head_labels, x=x, xaxis="step",
                             yaxis=f"{name} score", title=f"{name} score of each head vs step")
            if self.phase_change:
                _mark(fig, self.phase_change["step"], "phase change")
            figs[f"induction_dynamics/{name}"] = fig
        fig = go.Figure([go.Scatter(x=x, y=self.repeated_half_loss.tolist(), mode="lines+markers",
                                    name="loss on the repeated half"),
                         go.Scatter(x=x, y=self.first_half_loss.tolist(), mode="lines+markers",
                                    name="loss on the first half"),
                         go.Scatter(x=x, y=self.icl_score.tolist(), mode="lines+markers", name="ICL score")])
        if self.phase_change:
            _mark(fig, self.phase_change["step"], "phase change")
        fig.update_layout(title="In-context learning vs step", xaxis_title="step", yaxis_title="nats")
        figs["induction_dynamics/icl"] = fig
        return figs


def induction_dynamics(run: Run, steps: Sequence[int] | None = None, n_rows: int = 500, seed: int = ANALYSIS_SEED,
                       device: str = "cpu", chunk_size: int = 250, progress: bool = True) -> InductionDynamics:
    """``induction.induction_circuit`` on each checkpoint (folded for the weight-based scores)."""
    from toylens.analyze.induction import INDUCTION_SCORES, induction_circuit, repeat_spec
    from toylens.model.fold import fold

    spec, why = repeat_spec(run.task)
    if spec is None:
        raise ValueError(why)
    steps = sorted(run.check_step(s) for s in (run.steps if steps is None else steps))
    check = run.batch(FOLD_CHECK_ROWS, device=device)
    results = []
    for step in tqdm(steps, disable=not progress, desc="induction over checkpoints"):
        model = run.model(step, device=device)
        folded = fold(model, check, tol=math.inf, chunk_size=chunk_size).model
        results.append(induction_circuit(model, spec, n_rows=n_rows, seed=seed, folded=folded, chunk_size=chunk_size))
    last = results[-1].circuit
    labels = results[-1].head_labels
    if last.get("found"):
        a, b = labels.index(last["partner_head"]), labels.index(last["induction_head"])
        n_heads = results[-1].copying.shape[1]
        kc = torch.tensor([float(r.composition["K"][a // n_heads, a % n_heads, b // n_heads, b % n_heads])
                           for r in results])
    else:
        kc = torch.full((len(steps),), math.nan)
    res = InductionDynamics(
        steps=steps, head_labels=labels,
        scores={n: torch.stack([r.scores[n] for r in results]) for n in INDUCTION_SCORES},
        icl_score=torch.tensor([r.icl_score for r in results]),
        repeated_half_loss=torch.tensor([r.repeated_half_loss for r in results]),
        first_half_loss=torch.tensor([r.first_half_loss for r in results]), k_composition=kc, circuit=last)
    res.phase_change = steepest_rise(steps, res.best_induction().tolist())
    return res


def locate_phases(steps: Sequence[int], train_acc: Sequence[float], test_loss: Sequence[float]) -> dict:
    """Nanda et al.'s phases from the curves (rules in the module constants):

    memorisation: from the start to the first checkpoint with train accuracy >= MEMORISED_ACC;
    clean-up: from where log test loss has made CLEANUP_FROM of its fall (peak after memorisation to its
    lowest point after the peak) to where it has made CLEANUP_TO of it; circuit formation: in between.
    A missing phase is None, with the reason in ``note``.
    """
    out: dict = {"memorisation": None, "circuit_formation": None, "cleanup": None, "note": ""}
    mem = next((i for i, a in enumerate(train_acc) if a >= MEMORISED_ACC), None)
    if mem is None:
        out["note"] = f"train accuracy never reached {MEMORISED_ACC}: the model has not memorised its training set"
        return out
    out["memorisation"] = [steps[0], steps[mem]]
    log = [math.log(max(v, 1e-30)) for v in test_loss]
    peak = max(range(mem, len(log)), key=lambda i: log[i])
    low = min(range(peak, len(log)), key=lambda i: log[i])
    fall = log[peak] - log[low]
    if fall < MIN_FALL:
        out["note"] = (f"test loss fell by a factor {math.exp(fall):.2f} after memorisation (less than e): no "
                       f"grokking yet, so no clean-up to locate; train longer")
        return out
    start = next(i for i in range(peak, low + 1) if log[i] <= log[peak] - CLEANUP_FROM * fall)
    end = next(i for i in range(start, low + 1) if log[i] <= log[peak] - CLEANUP_TO * fall)
    out["circuit_formation"] = [steps[mem], steps[start]]
    out["cleanup"] = [steps[start], steps[end]]
    return out


@dataclass
class GrokkingDynamics(Result):
    steps: list[int]
    key_freqs: list[int]  # of the last checkpoint, used at every step (as Nanda et al. do)
    losses: dict[str, Tensor]  # "loss/train", "restricted/test", ... -> [step]
    accuracy: dict[str, Tensor]  # train | test -> [step]
    sum_sq_weights: Tensor
    key_share: Tensor  # share of the embedding's squared norm in the key frequencies
    n_freq_90: Tensor  # frequencies needed to hold 90% of the embedding's squared norm
    phases: dict = field(default_factory=dict)

    def figures(self) -> dict:
        x = self.steps
        colors = {"memorisation": "rgba(31,119,180,0.10)", "circuit_formation": "rgba(255,127,14,0.12)",
                  "cleanup": "rgba(44,160,44,0.12)"}

        def shade(fig):
            for name, color in colors.items():
                span = self.phases.get(name)
                if span:  # circuit formation labelled on its right: a short memorisation's label sits on its left
                    fig.add_vrect(x0=span[0], x1=span[1], fillcolor=color, line_width=0,
                                  annotation_text=name.replace("_", " "),
                                  annotation_position="top right" if name == "circuit_formation" else "top left")
            return fig

        fig = go.Figure([go.Scatter(x=x, y=v.tolist(), mode="lines", name=k,
                                    line=dict(dash="solid" if k.startswith("loss") else "dot"))
                         for k, v in self.losses.items()])
        fig.update_layout(title=f"Loss, restricted and excluded loss (key frequencies {self.key_freqs})",
                          xaxis_title="step", yaxis_title="cross-entropy")
        fig.update_yaxes(type="log")
        figs = {"grokking/losses": shade(fig)}
        fig = go.Figure([go.Scatter(x=x, y=v.tolist(), mode="lines", name=f"{k} accuracy")
                         for k, v in self.accuracy.items()])
        fig.update_layout(title="Train and test accuracy", xaxis_title="step", yaxis_title="accuracy")
        figs["grokking/accuracy"] = shade(fig)
        fig = go.Figure(go.Scatter(x=x, y=self.sum_sq_weights.tolist(), mode="lines", name="sum of squared weights"))
        fig.update_layout(title="Sum of squared weights", xaxis_title="step", yaxis_title="Σ w²")
        figs["grokking/weights"] = shade(fig)
        fig = go.Figure(go.Scatter(x=x, y=self.key_share.tolist(), mode="lines", name="key-frequency share"))
        fig.update_layout(title="Fourier sparsity of the embedding: share of its norm² in the key frequencies",
                          xaxis_title="step", yaxis_title="share", yaxis_range=[0, 1])
        figs["grokking/sparsity"] = shade(fig)
        return figs


def grokking_dynamics(run: Run, steps: Sequence[int] | None = None, device: str = "cpu",
                      progress: bool = True) -> GrokkingDynamics:
    """``fourier.fourier_analysis`` (without neurons) on each checkpoint, with the last one's key frequencies."""
    from toylens.analyze.fourier import embedding_by_freq, fourier_analysis, key_frequencies

    task = run.task
    if task.name != "modular_add":
        raise ValueError(f"task {task.name!r} is not modular_add: grokking dynamics need a modular_add run")
    steps = sorted(run.check_step(s) for s in (run.steps if steps is None else steps))
    p = task.cfg.p
    keys = key_frequencies(embedding_by_freq(run.model(steps[-1]).W_E[:p].detach())[1])
    rows = []
    for step in tqdm(steps, disable=not progress, desc="fourier over checkpoints"):
        rows.append(fourier_analysis(run.model(step, device=device), task, key_freqs=keys, neurons=False))
    losses = {f"{kind}/{split}": torch.tensor([r.losses[kind][split] for r in rows])
              for kind in ("loss", "restricted", "excluded") for split in ("train", "test")}
    acc = {split: torch.tensor([r.accuracy[split] for r in rows]) for split in ("train", "test")}
    n90 = []
    for r in rows:
        s = r.embed_sq_by_freq[1:].sort(descending=True).values
        n90.append(int((s.cumsum(0) < 0.9 * s.sum()).sum()) + 1)
    res = GrokkingDynamics(steps=steps, key_freqs=keys, losses=losses, accuracy=acc,
                           sum_sq_weights=torch.tensor([r.sum_sq_weights for r in rows]),
                           key_share=torch.tensor([r.key_share for r in rows]), n_freq_90=torch.tensor(n90))
    res.phases = locate_phases(steps, acc["train"].tolist(), losses["loss/test"].tolist())
    return res
