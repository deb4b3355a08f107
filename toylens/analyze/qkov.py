"""QK and OV circuits per head, copying scores and composition scores, from the weights alone.

Run on a FOLDED model (``toylens.model.fold.fold(model, batch).model``): with LayerNorm still
unfolded, ``W_E W_Q`` ignores the LN weights that sit between them. Biases are ignored, as usual.

Circuits (TransformerLens ``FactoredMatrix`` products, materialised only for the tokens asked for):

- QK token circuit ``W_E W_Q W_K^T W_E^T``: ``[layer, head_index, query_token, key_token]``.
- QK positional circuit ``W_pos W_Q W_K^T W_pos^T``: ``[layer, head_index, query_pos, key_pos]``,
  only with standard positional embeddings (not "none", not rotary).
- OV logit circuit ``W_E W_V W_O W_U``: ``[layer, head_index, src_token, logit_token]``.
- OV neuron circuit ``W_E W_V W_O W_in[mlp_layer]`` for every MLP the head can write to, its own
  layer's (as the notebook reads layer 0) and every later one: ``ov_mlp[(layer, mlp_layer)]`` is
  ``[head_index, src_token, d_mlp]``.

Scores (always over the full vocabulary, never materialising more than ``chunk_size`` rows):

- ``copying_score``: sum(eigenvalues) / sum(|eigenvalues|) of the full OV circuit
  ``W_E W_V W_O W_U`` (Elhage et al. 2021, "A Mathematical Framework"): +1 for a pure copying head.
- ``self_top1_fraction``: fraction of tokens whose largest OV logit is the token itself.
- ``composition``: "Q", "K", "V" -> ``[layer, head_index, layer, head_index]`` from
  ``model.all_composition_scores`` (zero unless the second head is in a later layer).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from toylens._compat import FactoredMatrix, HookedTransformer
from toylens.analyze import plots
from toylens.model.build import positional_embedding_type
from toylens.model.circuits import full_ov_circuit  # noqa: F401  (also public here)
from toylens.result import Result, jsonable

MATRIX_FIELDS = ("qk_token", "qk_pos", "ov_logit", "ov_mlp")


@dataclass
class CircuitsResult(Result):
    """Circuit matrices (``None`` when not materialised) and per-head scores; see the module docstring.

    ``token_ids``: the tokens indexing the rows/columns of the token matrices (None: none built).
    ``to_dict`` keeps the scores and leaves the matrices (which can be d_vocab x d_vocab) to figures.
    """

    head_labels: list[str]
    positional_embedding_type: str
    copying_score: Float[Tensor, "layer head_index"]
    self_top1_fraction: Float[Tensor, "layer head_index"]
    composition: dict[str, Float[Tensor, "layer head_index layer head_index"]]
    token_ids: list[int] | None = None
    token_names: list[str] | None = None
    qk_token: Float[Tensor, "layer head_index query_token key_token"] | None = None
    qk_pos: Float[Tensor, "layer head_index query_pos key_pos"] | None = None
    ov_logit: Float[Tensor, "layer head_index src_token logit_token"] | None = None
    ov_mlp: dict[tuple[int, int], Float[Tensor, "head_index src_token d_mlp"]] = field(default_factory=dict)
    note: str = ""

    def to_dict(self) -> dict:
        d = {k: v for k, v in vars(self).items() if k not in MATRIX_FIELDS and k != "token_names"}
        d["scores_by_head"] = {
            label: {"copying_score": float(self.copying_score.reshape(-1)[i]),
                    "self_top1_fraction": float(self.self_top1_fraction.reshape(-1)[i])}
            for i, label in enumerate(self.head_labels)}
        d["materialised"] = [k for k in MATRIX_FIELDS if getattr(self, k) not in (None, {})]
        return jsonable(d)

    def figures(self) -> dict:
        figs = {}
        n_layers, n_heads = self.copying_score.shape
        toks = plots.token_labels(self.token_ids, self.token_names) if self.token_ids is not None else None
        for layer in range(n_layers):
            for head in range(n_heads):
                name = f"L{layer}H{head}"
                if self.qk_token is not None:
                    figs[f"circuits/qk_token/{name}"] = plots.heatmap(
                        self.qk_token[layer, head], x_labels=toks, y_labels=toks, xaxis="key token",
                        yaxis="query token", title=f"{name} QK circuit W_E W_Q W_K^T W_E^T")
                if self.qk_pos is not None:
                    figs[f"circuits/qk_pos/{name}"] = plots.heatmap(
                        self.qk_pos[layer, head], xaxis="key_pos", yaxis="query_pos",
                        title=f"{name} positional QK circuit W_pos W_Q W_K^T W_pos^T")
                if self.ov_logit is not None:
                    figs[f"circuits/ov_logit/{name}"] = plots.heatmap(
                        self.ov_logit[layer, head], x_labels=toks, y_labels=toks, xaxis="logit token",
                        yaxis="source token", title=f"{name} OV circuit W_E W_V W_O W_U")
                for (head_layer, mlp_layer), m in self.ov_mlp.items():
                    if head_layer == layer:
                        figs[f"circuits/ov_mlp/{name}->blocks.{mlp_layer}.mlp"] = plots.heatmap(
                            m[head], y_labels=toks, xaxis="neuron", yaxis="source token",
                            title=f"{name} OV circuit into MLP {mlp_layer}: W_E W_V W_O W_in[{mlp_layer}]")
        figs["circuits/copying_score"] = plots.bar(
            self.copying_score.reshape(-1), labels=self.head_labels, title="OV copying score (eigenvalues)")
        figs["circuits/self_top1_fraction"] = plots.bar(
            self.self_top1_fraction.reshape(-1), labels=self.head_labels,
            title="Fraction of tokens whose top OV logit is themselves")
        for mode, scores in self.composition.items():
            figs[f"circuits/composition_{mode}"] = plots.heatmap(
                scores.reshape(n_layers * n_heads, n_layers * n_heads), x_labels=self.head_labels,
                y_labels=self.head_labels, diverging=False, xaxis="later head", yaxis="earlier head",
                title=f"{mode}-composition scores")
        return figs


def copying_scores(full_ov: FactoredMatrix) -> Float[Tensor, "*heads"]:
    """sum(eigenvalues) / sum(|eigenvalues|), from the small ``BA`` factor (same nonzero eigenvalues)."""
    eig = full_ov.eigenvalues
    return eig.sum(-1).real / eig.abs().sum(-1).clamp(min=1e-30)


def self_top1_fraction(full_ov: FactoredMatrix, chunk_size: int = 256) -> Float[Tensor, "*heads"]:
    """Fraction of source tokens whose OV row is largest at the token itself (rows in chunks)."""
    A, B = full_ov.A, full_ov.B
    n = A.shape[-2]
    hits = torch.zeros(full_ov.shape[:-2], device=A.device)
    for start in range(0, n, chunk_size):
        rows = A[..., start:start + chunk_size, :] @ B  # [..., chunk, d_vocab]
        ids = torch.arange(start, start + rows.shape[-2], device=A.device)
        hits += (rows.argmax(-1) == ids).float().sum(-1)
    return hits / n


def _warn_if_unfolded(model: HookedTransformer) -> None:
    if model.cfg.normalization_type in ("LN", "RMS"):
        warnings.warn("circuits on an unfolded LN/RMS model ignore the norm weights; fold it first "
                      "(toylens.model.fold.fold)", stacklevel=3)


@torch.no_grad()
def circuits(model: HookedTransformer, token_names: Sequence[str] | None = None,
             token_subset: Sequence[int] | None = None, max_vocab: int = 1024,
             chunk_size: int = 256) -> CircuitsResult:
    """QK/OV circuit matrices, copying and composition scores of every head.

    Token matrices are built for ``token_subset`` (rows and columns), or for the whole vocabulary
    when no subset is given and ``d_vocab <= max_vocab``; otherwise they are left as None and only
    the scores (computed without materialising d_vocab x d_vocab) are returned.
    """
    _warn_if_unfolded(model)
    cfg = model.cfg
    pos_type = positional_embedding_type(model)
    full_ov = full_ov_circuit(model)
    result = CircuitsResult(
        head_labels=model.all_head_labels(),
        positional_embedding_type=pos_type,
        copying_score=copying_scores(full_ov).cpu(),
        self_top1_fraction=self_top1_fraction(full_ov, chunk_size).cpu(),
        composition={mode: model.all_composition_scores(mode).cpu() for mode in ("Q", "K", "V")},
        token_names=list(token_names) if token_names is not None else None,
    )
    if pos_type == "standard":
        result.qk_pos = (model.W_pos @ model.QK @ model.W_pos.T).AB.cpu()
    if token_subset is None and cfg.d_vocab > max_vocab:
        result.note = (f"d_vocab={cfg.d_vocab} > max_vocab={max_vocab}: token matrices not built; "
                       "pass token_subset to build them for some tokens")
        return result
    ids = torch.as_tensor(list(token_subset) if token_subset is not None else range(cfg.d_vocab),
                          dtype=torch.long, device=model.W_E.device)
    W_E = model.W_E[ids]
    result.token_ids = ids.tolist()
    result.qk_token = (W_E @ model.QK @ W_E.T).AB.cpu()
    result.ov_logit = full_ov_circuit(model, ids).AB.cpu()
    if not cfg.attn_only:
        W_in = model.W_in
        for layer in range(cfg.n_layers):
            ov = W_E @ model.OV[layer]
            for mlp_layer in range(layer, cfg.n_layers):
                result.ov_mlp[(layer, mlp_layer)] = (ov @ W_in[mlp_layer]).AB.cpu()
    return result
