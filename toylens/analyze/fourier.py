"""Modular addition in the Fourier basis (Nanda et al. 2023): key frequencies of the embedding, neurons clustered by
frequency, the logits in the 2-D Fourier basis, restricted and excluded losses. Definitions: docs/analyses.md."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from toylens._compat import HookedTransformer
from toylens.analyze import plots
from toylens.result import Result

KEY_FACTOR = 4.0  # a key frequency holds at least 4x the embedding norm² share of an average one
CLUSTER_MIN = 0.5  # a neuron joins its best key frequency's cluster when that explains >= half its variance


def fourier_basis(p: int) -> tuple[Float[Tensor, "basis x"], list[str], Tensor]:
    """(orthonormal basis ``[p, p]``, row names ``const, cos 1, sin 1, ...``, frequency of each row)."""
    x = torch.arange(p, dtype=torch.float64)
    rows, names, freq = [torch.full((p,), 1 / math.sqrt(p), dtype=torch.float64)], ["const"], [0]
    for k in range(1, p // 2 + 1):
        for fn, name in ((torch.cos, "cos"), (torch.sin, "sin")):
            v = fn(2 * math.pi * k * x / p)
            if float(v.norm()) < 1e-6:  # sin(pi x) for even p
                continue
            rows.append(v / v.norm())
            names.append(f"{name} {k}")
            freq.append(k)
    return torch.stack(rows).float(), names, torch.tensor(freq)


def freq_sums(sq: Tensor, freq: Tensor, dim: int) -> Tensor:
    """Sum of ``sq`` over the basis rows of each frequency along ``dim`` (frequency 0 first)."""
    out = torch.zeros(*sq.shape[:dim], int(freq.max()) + 1, *sq.shape[dim + 1:], dtype=sq.dtype)
    return out.index_add_(dim, freq, sq)


def embedding_by_freq(W_E: Float[Tensor, "p d_model"]) -> tuple[Tensor, Tensor]:
    """(norm of the embedding along each basis row ``[p]``, squared norm per frequency ``[p//2 + 1]``)."""
    basis, _, freq = fourier_basis(W_E.shape[0])
    coef = basis @ W_E.float()
    sq = coef.pow(2).sum(-1)
    return sq.sqrt(), freq_sums(sq, freq, 0)


def key_frequencies(sq_by_freq: Tensor, factor: float = KEY_FACTOR) -> list[int]:
    """Frequencies (>= 1) whose share of the non-constant squared norm is >= ``factor`` / (number of them)."""
    s = sq_by_freq[1:]
    share = s / s.sum().clamp(min=1e-30)
    return [int(k) + 1 for k in torch.nonzero(share >= factor / len(s)).flatten()]


def neuron_freq_fraction(acts: Float[Tensor, "p p neuron"]) -> Float[Tensor, "freq neuron"]:
    """Fraction of each neuron's variance over (a, b) explained by each frequency k (row k; row 0 is 0)."""
    p = acts.shape[0]
    basis, _, freq = fourier_basis(p)
    coef = torch.einsum("ia,abn,jb->ijn", basis, acts.float(), basis)
    sq = freq_sums(freq_sums(coef.pow(2), freq, 0), freq, 1)  # [freq, freq, neuron]
    var = coef.pow(2).sum((0, 1)) - coef[0, 0].pow(2)
    k = torch.arange(1, sq.shape[0])
    explained = sq[0, k] + sq[k, 0] + sq[k, k]
    frac = explained / var.clamp(min=1e-30)
    frac = torch.where(var > 1e-12, frac, torch.full_like(frac, math.nan))
    return torch.cat([torch.zeros_like(frac[:1]), frac])


def sum_directions(p: int, freqs: list[int]) -> Float[Tensor, "direction pair"]:
    """Unit vectors over the p² pairs (index a*p + b) along cos(w_k(a+b)) and sin(w_k(a+b))."""
    a = torch.arange(p, dtype=torch.float64)
    s = (a[:, None] + a[None, :]).reshape(-1)
    out = []
    for k in freqs:
        for fn in (torch.cos, torch.sin):
            v = fn(2 * math.pi * k * s / p)
            if float(v.norm()) > 1e-6:
                out.append(v / v.norm())
    return torch.stack(out).float() if out else torch.zeros(0, p * p)


def key_projection(logits: Float[Tensor, "pair d_vocab"], p: int, freqs: list[int]) -> Tensor:
    """The part of the logits (rows: the p² pairs in order a*p + b) along ``sum_directions``."""
    d = sum_directions(p, freqs)
    return d.T @ (d @ logits.float())


def restricted_logits(logits: Float[Tensor, "pair d_vocab"], p: int, freqs: list[int]) -> Tensor:
    return logits.float().mean(0, keepdim=True) + key_projection(logits, p, freqs)


def excluded_logits(logits: Float[Tensor, "pair d_vocab"], p: int, freqs: list[int]) -> Tensor:
    return logits.float() - key_projection(logits, p, freqs)


def split_losses(logits: Tensor, targets: Tensor, train: Tensor) -> dict[str, float]:
    """Mean cross-entropy over the train pairs and over the others (``train``: bool over pairs)."""
    nll = F.cross_entropy(logits.float(), targets, reduction="none")
    out = {"train": float(nll[train].mean()) if bool(train.any()) else math.nan,
           "test": float(nll[~train].mean()) if bool((~train).any()) else math.nan}
    return out


def grid(task) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens ``[p², 3]`` of every pair in order a*p + b, targets ``[p²]``, train mask ``[p²]``)."""
    p = task.cfg.p
    a, b = torch.arange(p).repeat_interleave(p), torch.arange(p).repeat(p)
    tokens = torch.stack([a, b, torch.full_like(a, task.EQ)], dim=1)
    train = torch.zeros(p * p, dtype=torch.bool)
    if hasattr(task, "split_pairs"):
        tr = task.split_pairs("train")
        train[tr[:, 0] * p + tr[:, 1]] = True
    else:  # no held-out split: every pair counts as trained on
        train[:] = True
    return tokens, (a + b) % p, train


@torch.no_grad()
def grid_forward(model: HookedTransformer, tokens: Tensor, chunk_size: int = 4096,
                 neurons: bool = True) -> tuple[Tensor, Tensor | None]:
    """Logits at ``=`` ``[pairs, d_vocab]`` and the last MLP's post-activation there ``[pairs, d_mlp]``."""
    hook_name = f"blocks.{model.cfg.n_layers - 1}.mlp.hook_post"
    logits, acts = [], []
    for i in range(0, len(tokens), chunk_size):
        rows = tokens[i:i + chunk_size].to(model.cfg.device)
        if neurons and not model.cfg.attn_only:
            out = model.run_with_hooks(rows, fwd_hooks=[(hook_name, lambda x, hook: acts.append(x[:, -1].cpu()))])
        else:
            out = model(rows)
        logits.append(out[:, -1].float().cpu())
    return torch.cat(logits), torch.cat(acts) if acts else None


@dataclass
class FourierResult(Result):
    p: int
    basis_names: list[str]
    embed_norm_by_basis: Float[Tensor, " basis"]
    embed_sq_by_freq: Float[Tensor, " freq"]  # index k = frequency; 0 the constant
    key_freqs: list[int]
    losses: dict[str, dict[str, float]]  # loss | restricted | excluded -> train | test
    accuracy: dict[str, float]
    logit_norm_2d: Float[Tensor, "basis basis"] | None = None  # norm over outputs of the 2-D coefficients
    neuron_frac: Float[Tensor, "freq neuron"] | None = None
    neuron_layer: int | None = None
    clusters: dict = field(default_factory=dict)  # "k" -> neuron count; "none": unclustered
    sum_sq_weights: float = 0.0

    @property
    def key_share(self) -> float:
        """Share of the embedding's non-constant squared norm in the key frequencies."""
        s = self.embed_sq_by_freq[1:]
        return float(s[[k - 1 for k in self.key_freqs]].sum() / s.sum()) if self.key_freqs else 0.0

    def best_key(self) -> tuple[Tensor, Tensor] | None:
        """(best key frequency of each neuron, the fraction of variance it explains)."""
        if self.neuron_frac is None or not self.key_freqs:
            return None
        frac = torch.nan_to_num(self.neuron_frac[self.key_freqs], nan=0.0)
        best, i = frac.max(0)
        return torch.tensor(self.key_freqs)[i], best

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["key_share"] = self.key_share
        bk = self.best_key()
        if bk is not None:
            d["neuron_best_key_freq"], d["neuron_best_key_frac"] = bk[0].tolist(), bk[1].tolist()
            d["neuron_best_key_frac_mean"] = float(bk[1].mean())
        return d

    def figures(self) -> dict:
        figs = {}
        k = list(range(1, len(self.embed_sq_by_freq)))
        norms = self.embed_sq_by_freq[1:].sqrt().tolist()
        fig = go.Figure(go.Bar(x=k, y=norms, marker_color=["crimson" if f in self.key_freqs else "steelblue"
                                                           for f in k]))
        fig.update_layout(title=f"Embedding norm per frequency (key, red: {self.key_freqs})", xaxis_title="frequency k",
                          yaxis_title="norm of W_E along cos k, sin k")
        figs["fourier/embedding"] = fig
        if self.logit_norm_2d is not None:
            figs["fourier/logits"] = plots.heatmap(
                self.logit_norm_2d, x_labels=self.basis_names, y_labels=self.basis_names, diverging=False,
                title="Logits in the 2-D Fourier basis (norm over outputs)", xaxis="b", yaxis="a")
        bk = self.best_key()
        if bk is not None:
            freq, frac = bk
            order = sorted(range(len(frac)), key=lambda i: (int(freq[i]), -float(frac[i])))
            fig = go.Figure(go.Scatter(x=list(range(len(order))), y=[float(frac[i]) for i in order], mode="markers",
                                       marker=dict(color=[int(freq[i]) for i in order], colorscale="Turbo",
                                                   showscale=True, colorbar=dict(title="key k")),
                                       text=[f"neuron {i}, k={int(freq[i])}" for i in order]))
            fig.add_hline(y=CLUSTER_MIN, line_dash="dot")
            fig.update_layout(title="Variance of each MLP neuron explained by its best key frequency",
                              xaxis_title="neuron (grouped by frequency)", yaxis_title="fraction of variance")
            figs["fourier/neurons"] = fig
        names = ["loss", "restricted", "excluded"]
        fig = go.Figure([go.Bar(name=split, x=names, y=[self.losses[n][split] for n in names])
                         for split in ("train", "test")])
        fig.update_layout(title="Loss, restricted loss (key frequencies only) and excluded loss (them removed)",
                          yaxis_title="cross-entropy", barmode="group")
        figs["fourier/losses"] = fig
        return figs


@torch.no_grad()
def fourier_analysis(model: HookedTransformer, task, key_freqs: list[int] | None = None, neurons: bool = True,
                     chunk_size: int = 4096) -> FourierResult:
    """Everything of the module docstring for a modular_add model; ``key_freqs`` default: from the embedding."""
    p = task.cfg.p
    basis, names, _ = fourier_basis(p)
    by_basis, sq = embedding_by_freq(model.W_E[:p].detach().cpu())
    keys = key_frequencies(sq) if key_freqs is None else list(key_freqs)
    tokens, targets, train = grid(task)
    logits, acts = grid_forward(model, tokens, chunk_size, neurons)
    losses = {"loss": split_losses(logits, targets, train),
              "restricted": split_losses(restricted_logits(logits, p, keys), targets, train),
              "excluded": split_losses(excluded_logits(logits, p, keys), targets, train)}
    correct = (logits.argmax(-1) == targets).float()
    accuracy = {"train": float(correct[train].mean()),
                "test": float(correct[~train].mean()) if bool((~train).any()) else math.nan}
    grid_logits = logits[:, :p].reshape(p, p, p)
    coef = torch.einsum("ia,abc,jb->ijc", basis, grid_logits, basis)
    res = FourierResult(p=p, basis_names=names, embed_norm_by_basis=by_basis, embed_sq_by_freq=sq, key_freqs=keys,
                        losses=losses, accuracy=accuracy, logit_norm_2d=coef.norm(dim=-1),
                        sum_sq_weights=sum_squared_weights(model))
    if acts is not None:
        res.neuron_layer = model.cfg.n_layers - 1
        res.neuron_frac = neuron_freq_fraction(acts.reshape(p, p, -1))
        bk = res.best_key()
        if bk is not None:
            freq, frac = bk
            res.clusters = {str(k): int(((freq == k) & (frac >= CLUSTER_MIN)).sum()) for k in keys}
            res.clusters["none"] = int((frac < CLUSTER_MIN).sum())
    return res


def sum_squared_weights(model: HookedTransformer) -> float:
    """Sum of squares of every trained parameter (what weight decay shrinks)."""
    return float(sum(p.detach().float().pow(2).sum() for p in model.parameters() if p.requires_grad))
