"""The unembedding, written once: ``ln_final`` and ``W_U`` (and the logit soft-cap) of any
HookedTransformer, at chosen positions and vocabulary columns, plus the target directions DLA projects on."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from toylens._compat import HookedTransformer

FUSED_NORMS = (None, "LN", "LNPre", "RMS", "RMSPre")


def norm_fn(kind: str | None, w: Tensor | None, b: Tensor | None, eps: float):
    """TransformerLens's LayerNorm / LayerNormPre / RMSNorm / RMSNormPre as one fused kernel."""
    if kind is None:
        return lambda x: x
    if kind in ("LN", "LNPre"):
        return lambda x: F.layer_norm(x, x.shape[-1:], w, b, eps)
    return lambda x: F.rms_norm(x, x.shape[-1:], w, eps)


def ln_params(module, kind: str | None) -> tuple[Tensor | None, Tensor | None]:
    """(w, b) of a norm module: LN has both, RMS only ``w``, the Pre variants and None neither."""
    if kind in ("LN", "RMS"):
        return module.w, getattr(module, "b", None) if kind == "LN" else None
    return None, None


class Unembed:
    """``ln_final`` then ``x @ W_U + b_U`` (then TransformerLens's soft-cap) for any model.

    ``columns``: only these vocabulary columns (metrics that read a few answer logits). ``for_loss``: pad
    the output to a multiple of 16 with logits of -inf (MKL's GEMM is 2-3x slower at some widths, e.g.
    300; exp(-inf) = 0 leaves log-softmax and argmax unchanged). ``detach``: copies laid out once (analysis);
    otherwise views of the parameters that gradients flow through (training).
    """

    def __init__(self, model: HookedTransformer, columns: Tensor | None = None, for_loss: bool = False,
                 detach: bool = True):
        c = model.cfg
        kind = c.normalization_type if getattr(model, "ln_final", None) is not None else None
        self.cap = c.output_logits_soft_cap
        with torch.no_grad() if detach else contextlib.nullcontext():
            if kind in FUSED_NORMS and not getattr(c, "final_rms", False):
                w, b = ln_params(getattr(model, "ln_final", None), kind)
                if detach:
                    w, b = (None if t is None else t.detach() for t in (w, b))
                self.norm = norm_fn(kind, w, b, c.eps)
            else:  # the model's own module: exact for any variant
                self.norm = model.ln_final
            w_u, b_u = model.unembed.W_U, model.unembed.b_U
            if columns is not None:
                w_u, b_u = w_u[:, columns], b_u[columns]
            w_u = w_u.T  # F.linear's [out, in]
            if for_loss:
                pad = -w_u.shape[0] % 16
                w_u = torch.cat([w_u, w_u.new_zeros(pad, w_u.shape[1])])
                b_u = torch.cat([b_u, b_u.new_full((pad,), -torch.inf)])
            self.W, self.b = (w_u.detach().contiguous(), b_u.detach().contiguous()) if detach else (w_u, b_u)

    def __call__(self, x: Tensor) -> Tensor:
        """Logits of residual-stream vectors ``x`` [..., d_model] (already at the wanted positions)."""
        return self.linear(self.norm(x))

    def linear(self, normalized: Tensor) -> Tensor:
        """Logits of ``ln_final``'s output (``unembed.hook_in``)."""
        logits = F.linear(normalized, self.W, self.b)
        if self.cap > 0:
            logits = self.cap * torch.tanh(logits / self.cap)
        return logits

    def at(self, resid: Tensor, positions: slice | Tensor | None = None, per_row: bool = False) -> Tensor:
        """Logits of ``resid`` [n, pos, d_model] at ``positions``: a slice or shared positions
        (``[n, P, vocab]``), or with ``per_row`` one position per row (``[n, vocab]``)."""
        if positions is None:
            return self(resid)
        if per_row:
            return self(resid[torch.arange(resid.shape[0], device=resid.device), positions])
        return self(resid[:, positions])


def logit_directions(model: HookedTransformer, targets: Tensor, relative_to_mean: bool = False
                     ) -> tuple[Tensor, Tensor]:
    """The direction each target's logit reads from the residual stream through ``ln_final`` (its ``w``,
    and the centring of LayerNorm), before dividing by ``ln_final``'s scale, and the logit's constant part.

    ``dla(x) = (x / scale) . direction`` for a component ``x`` (DLA with the cached scale), and
    ``logit = sum(dla) + bias``. ``relative_to_mean``: of ``logit - mean over the vocabulary``.
    Returns ``direction`` [*targets.shape, d_model] and ``bias`` [*targets.shape].
    """
    kind = model.cfg.normalization_type
    ln = getattr(model, "ln_final", None)
    w_u, b_u = model.W_U, model.b_U
    if relative_to_mean:
        w_u, b_u = w_u - w_u.mean(-1, keepdim=True), b_u - b_u.mean()
    direction = w_u.T[targets]  # [..., d_model]
    bias = b_u[targets]
    if ln is not None and kind is not None:
        w, b = getattr(ln, "w", None), getattr(ln, "b", None)
        if b is not None:
            bias = bias + direction @ b
        if w is not None:
            direction = direction * w
        if kind in ("LN", "LNPre"):  # (x - mean x) . d == x . (d - mean d)
            direction = direction - direction.mean(-1, keepdim=True)
    return direction, bias
