"""Induction heads (Elhage et al. 2021; Olsson et al. 2022): head scores on repeated random segments, OV copying,
K-composition from earlier heads, the in-context-learning score and per-position loss. Definitions:
docs/analyses.md, "Induction heads"."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from toylens._compat import FactoredMatrix, HookedTransformer
from toylens.analyze import plots
from toylens.analyze.attention import head_score_sums, score_masks
from toylens.result import Result

INDUCTION_SCORES = ("previous_token", "induction", "prefix_matching")


@dataclass(frozen=True)
class RepeatSpec:
    """How to build analysis sequences for a task: symbols ``low..high-1``, an optional BOS, half length L."""

    half_len: int
    low: int
    high: int
    bos: int | None = None

    @property
    def start(self) -> int:  # position of x_1
        return 0 if self.bos is None else 1

    @property
    def seq_len(self) -> int:
        return self.start + 2 * self.half_len


def repeat_spec(task, n_ctx: int | None = None) -> tuple[RepeatSpec | None, str]:
    """(spec, "") for a task whose sequences repeat a random segment, else (None, the reason).

    The analysis segment has the task's length L, except with the task's fixed layout ``[BOS, x, x]``:
    there a head can find the induction key by position alone (always L - 1 back), so the analysis
    uses ``L - max(1, L // 4)`` and only a head that matches content scores on the repeat.
    """
    cfg = task.cfg
    if "induction" not in task.name or not hasattr(cfg, "n_symbols"):
        return None, (f"task {task.name!r} has no repeated random segments (induction scores need an "
                      f"induction task, e.g. experiment=induction_heads)")
    bos = getattr(task, "BOS", None)
    half = getattr(cfg, "half_len", None) or (task.seq_len - (bos is not None)) // 2
    if getattr(cfg, "layout", "fixed") == "fixed" and half > 2:
        half -= max(1, half // 4)
    n_ctx = task.seq_len if n_ctx is None else min(n_ctx, task.seq_len)
    half = min(half, (n_ctx - (bos is not None)) // 2)
    low = 1 if bos == 0 else 0
    return RepeatSpec(half_len=half, low=low, high=low + cfg.n_symbols, bos=bos), ""


def repeated_tokens(spec: RepeatSpec, n_rows: int, seed: int) -> Int[Tensor, "batch pos"]:
    """``n_rows`` sequences ``[BOS?, x, x]`` with ``x`` uniform over the symbols (CPU, seeded)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(spec.low, spec.high, (n_rows, spec.half_len), generator=gen)
    parts = [x, x] if spec.bos is None else [torch.full((n_rows, 1), spec.bos), x, x]
    return torch.cat(parts, dim=1)


def induction_masks(tokens: Int[Tensor, "batch pos"], spec: RepeatSpec) -> dict[str, Tensor]:
    """The ``[batch, query_pos, key_pos]`` masks of ``INDUCTION_SCORES`` (see the module docstring)."""
    b, n = tokens.shape
    base = score_masks(tokens)
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    repeat = (q >= spec.start + spec.half_len) & (k == q - spec.half_len + 1)
    return {"previous_token": base["previous_token"], "induction": repeat[None].expand(b, n, n),
            "prefix_matching": base["induction"]}


def positive_eigenvalue_fraction(full_ov: FactoredMatrix) -> Float[Tensor, "*heads"]:
    """sum(max(Re λ, 0)) / sum(|λ|) of each matrix (from the small factor: same nonzero eigenvalues)."""
    eig = full_ov.eigenvalues
    return eig.real.clamp(min=0).sum(-1) / eig.abs().sum(-1).clamp(min=1e-30)


def icl_positions(n_predicted: int) -> tuple[int, int]:
    """(early, late) indices into the per-position loss: Olsson's 50th and 500th of 512 tokens, scaled."""
    early = max(0, min(n_predicted - 1, round(n_predicted * 50 / 512)))
    late = max(0, min(n_predicted - 1, round(n_predicted * 500 / 512)))
    return early, late


@dataclass
class InductionResult(Result):
    """Scores per head (``[layer, head_index]``), composition ``[layer, head_index, layer, head_index]``,
    per-position loss (``loss_by_pos[t]``: predicting token ``t + 1`` from position ``t``) and the circuit."""

    head_labels: list[str]
    scores: dict[str, Float[Tensor, "layer head_index"]]
    copying: Float[Tensor, "layer head_index"]
    copying_signed: Float[Tensor, "layer head_index"]
    composition: dict[str, Float[Tensor, "layer head_index layer head_index"]]
    loss_by_pos: Float[Tensor, " pos"]
    half_len: int
    start: int
    n_rows: int
    icl_early_pos: int = 0
    icl_late_pos: int = 0
    circuit: dict = field(default_factory=dict)

    @property
    def icl_score(self) -> float:
        return float(self.loss_by_pos[self.icl_late_pos] - self.loss_by_pos[self.icl_early_pos])

    @property
    def repeated_half_loss(self) -> float:
        """Mean loss predicting the repeat's tokens x_2..x_L (from positions start+L .. start+2L-2)."""
        s, L = self.start, self.half_len
        return float(self.loss_by_pos[s + L:s + 2 * L - 1].mean())

    @property
    def first_half_loss(self) -> float:
        """Mean loss predicting x_2..x_L in the first half (random: ≈ log of the number of symbols)."""
        s, L = self.start, self.half_len
        return float(self.loss_by_pos[s:s + L - 1].mean())

    def to_dict(self) -> dict:
        d = super().to_dict()
        flat = {n: s.reshape(-1) for n, s in self.scores.items()}
        d["scores_by_head"] = {h: {**{n: float(s[i]) for n, s in flat.items()},
                                   "copying": float(self.copying.reshape(-1)[i]),
                                   "copying_signed": float(self.copying_signed.reshape(-1)[i])}
                               for i, h in enumerate(self.head_labels)}
        d.update(icl_score=self.icl_score, repeated_half_loss=self.repeated_half_loss,
                 first_half_loss=self.first_half_loss)
        return d

    def figures(self) -> dict:
        figs = {}
        names = [*INDUCTION_SCORES, "copying"]
        table = torch.stack([*(self.scores[n].reshape(-1) for n in INDUCTION_SCORES), self.copying.reshape(-1)])
        figs["induction/head_scores"] = plots.heatmap(
            table, x_labels=self.head_labels, y_labels=names, diverging=False, zmin=0.0, zmax=1.0,
            title="Head scores on repeated random segments (copying: OV eigenvalues)", xaxis="head", yaxis="score")
        n_layers, n_heads = self.copying.shape
        if n_layers >= 2:
            k = self.composition["K"]
            figs["induction/k_composition"] = plots.heatmap(
                k[0, :, 1, :].T, x_labels=self.head_labels[:n_heads], y_labels=self.head_labels[n_heads:2 * n_heads],
                diverging=False, zmin=0.0, title="K-composition: layer-0 head (column) into layer-1 head (row)",
                xaxis="layer-0 head (writes)", yaxis="layer-1 head (reads as key)")
        s, L = self.start, self.half_len
        pos = list(range(len(self.loss_by_pos)))
        fig = go.Figure(go.Scatter(x=pos, y=self.loss_by_pos.tolist(), mode="lines+markers", name="loss"))
        fig.add_vrect(x0=s + L - 0.5, x1=s + 2 * L - 1.5, fillcolor="green", opacity=0.08, line_width=0,
                      annotation_text="repeated half", annotation_position="top left")
        for p, name in ((self.icl_early_pos, "early"), (self.icl_late_pos, "late")):
            fig.add_vline(x=p, line_dash="dot", annotation_text=f"ICL {name}")
        fig.update_layout(title=f"Loss per position on [BOS, x, x] (ICL score {self.icl_score:+.3f})",
                          xaxis_title="position predicting the next token", yaxis_title="loss (nats)")
        figs["induction/loss_by_pos"] = fig
        return figs


def name_circuit(head_labels: list[str], scores: dict[str, Tensor], composition: Tensor) -> dict:
    """The induction head (highest ``induction`` score in layer >= 1), its K-composition partner (the
    earlier head with the largest K-composition into it) and the one-line name of the pair."""
    n_layers, n_heads = scores["induction"].shape
    if n_layers < 2:
        return {"line": "one layer: no head can compose with an earlier one, so no induction circuit",
                "found": False}
    ind = torch.nan_to_num(scores["induction"].clone(), nan=-1.0)
    ind[0] = -math.inf
    flat = int(ind.reshape(-1).argmax())
    il, ih = divmod(flat, n_heads)
    comp = composition[:il, :, il, ih]  # every earlier head into the induction head
    pflat = int(comp.reshape(-1).argmax())
    pl, ph = divmod(pflat, n_heads)
    prev = torch.nan_to_num(scores["previous_token"][:il].clone(), nan=-1.0)
    best_prev = int(prev.reshape(-1).argmax())
    pair = composition[:il, :, il:, :]  # earlier -> this and later layers, for a baseline
    out = {
        "induction_head": head_labels[flat], "induction_score": float(scores["induction"][il, ih]),
        "partner_head": head_labels[pflat], "k_composition": float(comp[pl, ph]),
        "partner_previous_token_score": float(scores["previous_token"][pl, ph]),
        "best_previous_token_head": head_labels[best_prev],
        "mean_k_composition_into_later_layers": float(pair[pair != 0].mean()) if bool((pair != 0).any()) else 0.0,
    }
    out["partner_is_previous_token_head"] = out["partner_head"] == out["best_previous_token_head"]
    out["line"] = (f"{out['partner_head']} (previous token {out['partner_previous_token_score']:.2f}) → "
                   f"K-composition {out['k_composition']:.2f} → {out['induction_head']} "
                   f"(induction {out['induction_score']:.2f})")
    out["found"] = True
    return out


@torch.no_grad()
def repeat_scores(model: HookedTransformer, tokens: Int[Tensor, "batch pos"], spec: RepeatSpec,
                  chunk_size: int = 250, progress: bool = False) -> tuple[dict[str, Tensor], Tensor]:
    """Attention scores ``{name: [layer, head_index]}`` and mean loss per position ``[pos - 1]``."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    sums = {n: torch.zeros(n_layers, n_heads) for n in INDUCTION_SCORES}
    counts = {n: torch.zeros(n_layers) for n in INDUCTION_SCORES}
    loss_sum = torch.zeros(tokens.shape[1] - 1, dtype=torch.float64)
    for start in tqdm(range(0, len(tokens), chunk_size), disable=not progress, desc="induction"):
        rows = tokens[start:start + chunk_size]
        masks = {k: v.to(model.cfg.device) for k, v in induction_masks(rows, spec).items()}
        rows = rows.to(model.cfg.device)

        def hook(pattern, hook, rows=rows, masks=masks):
            for name, (s, c) in head_score_sums(pattern.float(), rows, masks).items():
                sums[name][hook.layer()] += s.cpu()
                counts[name][hook.layer()] += c.cpu()

        logits = model.run_with_hooks(rows, fwd_hooks=[(f"blocks.{i}.attn.hook_pattern", hook)
                                                       for i in range(n_layers)]).float()
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), rows[:, 1:].flatten(), reduction="none")
        loss_sum += nll.reshape(len(rows), -1).sum(0).double().cpu()
    scores = {n: sums[n] / counts[n][:, None].clamp(min=1) for n in INDUCTION_SCORES}
    scores = {n: torch.where(counts[n][:, None] > 0, s, torch.full_like(s, math.nan)) for n, s in scores.items()}
    return scores, (loss_sum / len(tokens)).float()


@torch.no_grad()
def induction_circuit(model: HookedTransformer, spec: RepeatSpec, n_rows: int = 1000, seed: int = 0,
                      folded: HookedTransformer | None = None, chunk_size: int = 250,
                      progress: bool = False) -> InductionResult:
    """Every score of the module docstring for ``model`` on ``n_rows`` repeated random sequences.

    ``folded``: the LayerNorm-folded model the weight-based scores (copying, composition) are read
    from (default: ``model`` itself, right when it has no LayerNorm).
    """
    from toylens.analyze.qkov import copying_scores, full_ov_circuit

    tokens = repeated_tokens(spec, n_rows, seed)
    scores, loss_by_pos = repeat_scores(model, tokens, spec, chunk_size, progress)
    w = folded if folded is not None else model
    full_ov = full_ov_circuit(w)
    composition = {m: w.all_composition_scores(m).cpu() for m in ("Q", "K", "V")}
    labels = model.all_head_labels()
    early, late = icl_positions(len(loss_by_pos))
    return InductionResult(
        head_labels=labels, scores=scores, copying=positive_eigenvalue_fraction(full_ov).cpu(),
        copying_signed=copying_scores(full_ov).cpu(), composition=composition, loss_by_pos=loss_by_pos,
        half_len=spec.half_len, start=spec.start, n_rows=n_rows, icl_early_pos=early, icl_late_pos=late,
        circuit=name_circuit(labels, scores, composition["K"]))
