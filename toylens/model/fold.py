"""Fold LayerNorm into the weights (TransformerLens's own processing) and prove on real tokens, in float64,
that the folded model computes the same log-probs. Why float64: docs/analyses.md, "Folding LayerNorm"."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from toylens._compat import HookedTransformer
from toylens.model.build import fold_layer_norm, positional_embedding_type
from toylens.result import Result

FOLDABLE = ("LN", "RMS")


class FoldCheckError(RuntimeError):
    """The folded model's log-probs differ from the original's by more than the tolerance."""


@dataclass
class FoldResult(Result):
    """The folded model plus the evidence that it computes the same function.

    ``model`` is the folded model (the original, unchanged, when there was nothing to fold); it is
    left out of ``to_dict``. ``max_abs_logprob_diff`` is max |log p_orig - log p_folded| over every
    batch row, position and vocabulary entry checked, both models run in float64 (what ``tol`` is
    held to); ``max_abs_logprob_diff_fp32`` is the same in the models' own float32.
    """

    model: HookedTransformer = field(repr=False)
    normalization_type: str | None
    folded_normalization_type: str | None
    positional_embedding_type: str
    max_abs_logprob_diff: float
    max_abs_logprob_diff_fp32: float
    tol: float
    passed: bool
    n_tokens_checked: int
    w_pos_norm_before: float | None
    w_pos_norm_after: float | None
    note: str = ""

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.pop("model", None)
        return d


def _w_pos_norm(model: HookedTransformer) -> float | None:
    return float(model.W_pos.detach().norm()) if model.cfg.positional_embedding_type == "standard" else None


@torch.no_grad()
def max_logprob_diff(model_a: HookedTransformer, model_b: HookedTransformer,
                     tokens: Int[Tensor, "batch pos"], chunk_size: int = 250,
                     progress: bool = False, dtype: torch.dtype | None = None) -> float:
    """max |log_softmax(a(tokens)) - log_softmax(b(tokens))| over all rows, positions and tokens,
    with both models run in ``dtype`` (copies; the inputs are untouched) when given."""
    if dtype is not None:
        model_a = copy.deepcopy(model_a).to(dtype, print_details=False)
        model_b = copy.deepcopy(model_b).to(dtype, print_details=False)
    worst = 0.0
    for start in tqdm(range(0, tokens.shape[0], chunk_size), disable=not progress, desc="fold check"):
        rows = tokens[start:start + chunk_size]
        lp_a = model_a(rows).log_softmax(-1)
        lp_b = model_b(rows).log_softmax(-1)
        worst = max(worst, float((lp_a - lp_b).abs().max()))
    return worst


def fold(model: HookedTransformer, batch: Int[Tensor, "batch pos"], tol: float = 1e-4,
         chunk_size: int = 250, progress: bool = False) -> FoldResult:
    """Fold LayerNorm (LN or RMS) and check the folded model against the original on ``batch``.

    Raises ``FoldCheckError`` when the largest log-prob difference exceeds ``tol``. A model with
    nothing to fold (``normalization_type`` None, or already LNPre/RMSPre) comes back unchanged,
    with difference 0 and a note. The input model is never modified.
    """
    tokens = getattr(batch, "tokens", batch)  # a toylens Batch or a token tensor
    tokens = tokens.to(model.cfg.device)
    norm = model.cfg.normalization_type
    pos_type = positional_embedding_type(model)
    w_pos_before = _w_pos_norm(model)
    if norm not in FOLDABLE:
        return FoldResult(
            model=model, normalization_type=norm, folded_normalization_type=norm,
            positional_embedding_type=pos_type, max_abs_logprob_diff=0.0, max_abs_logprob_diff_fp32=0.0,
            tol=tol, passed=True,
            n_tokens_checked=0, w_pos_norm_before=w_pos_before, w_pos_norm_after=w_pos_before,
            note=f"normalization_type={norm!r}: nothing to fold, model returned unchanged",
        )
    folded = fold_layer_norm(model)
    diff = max_logprob_diff(model, folded, tokens, chunk_size=chunk_size, progress=progress, dtype=torch.float64)
    diff_fp32 = max_logprob_diff(model, folded, tokens, chunk_size=chunk_size)
    w_pos_after = _w_pos_norm(folded)
    if pos_type == "none" and w_pos_after != 0.0:
        raise FoldCheckError(f"positional embedding 'none' but folded W_pos has norm {w_pos_after:.3g}")
    if not diff <= tol:  # also catches NaN
        raise FoldCheckError(
            f"LayerNorm folding changed the model: max |delta log-prob| (float64) = {diff:.3g} > tol = {tol:.3g} "
            f"on {tokens.numel()} tokens"
        )
    return FoldResult(
        model=folded, normalization_type=norm, folded_normalization_type=folded.cfg.normalization_type,
        positional_embedding_type=pos_type, max_abs_logprob_diff=diff, max_abs_logprob_diff_fp32=diff_fp32,
        tol=tol, passed=True,
        n_tokens_checked=tokens.numel(), w_pos_norm_before=w_pos_before, w_pos_norm_after=w_pos_after,
        note="folded with fold_ln, center_writing_weights (LN only), center_unembed, fold_value_biases",
    )
