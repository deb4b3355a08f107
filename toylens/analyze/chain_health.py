"""Whether SGLD chains can be trusted (``chain_health``), and the gradient norms its step-size check reads
(``GradNorms``: hooks on each chain's own model copy). Used by ``toylens.analyze.learning_coefficient``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

# chain-health thresholds (see ``chain_health``)
DIVERGE_FACTOR, DIVERGE_ABS = 3.0, 0.5  # a chain whose loss passes 3 x (init + 0.5) has blown up
FLAT_REL = 1e-6  # a trace moving less than this (relative to the init loss) has not moved at all
DRIFT_MAX = 0.5  # median |ε/2 n·β ∇L| / |√ε ξ|: above it the step is too large for the loss's curvature
DRIFT_REL = 0.2  # last-quarter mean minus third-quarter mean, as a share of (mean - init): still drifting



def chain_health(trace: Tensor, init_loss: float, drift_ratio: Sequence[float], failed: Sequence[str] = ()) -> dict:
    """Whether the chains can be trusted, with one warning per problem naming the ``llc.*`` key to change:

    diverged: a non-finite loss, a chain devinterp stopped, or a loss past ``DIVERGE_FACTOR`` x (init +
    ``DIVERGE_ABS``) -> lower ``llc.lr`` (or raise ``llc.localization``); flat: the trace never moves -> raise
    ``llc.lr``; step size: SGLD's drift exceeds ``DRIFT_MAX`` x its noise (the proxy for a Metropolis test's
    acceptance, which devinterp 2 does not compute) -> lower ``llc.lr``; still drifting: the last quarter's
    mean differs from the third's by more than ``DRIFT_REL`` of (mean - init) -> raise ``llc.num_draws``
    or ``llc.localization``; negative: the chain found lower loss than the checkpoint (not at a minimum).
    """
    warn: list[dict] = []
    finite = bool(torch.isfinite(trace).all())
    limit = DIVERGE_FACTOR * (init_loss + DIVERGE_ABS)
    if failed or not finite or (finite and float(trace.max()) > limit):
        why = (failed[0] if failed else "the loss became NaN or inf" if not finite else
               f"the loss rose to {float(trace.max()):.3g}, past {DIVERGE_FACTOR:g} x (the init loss "
               f"{init_loss:.3g} + {DIVERGE_ABS:g})")
        warn.append({"check": "diverged", "key": "llc.lr",
                     "text": f"SGLD diverged ({why}): lower llc.lr (or raise llc.localization)"})
    elif float((trace - init_loss).abs().max()) <= FLAT_REL * max(abs(init_loss), 1e-3):
        warn.append({"check": "flat", "key": "llc.lr",
                     "text": "the SGLD loss trace does not move: raise llc.lr"})
    else:
        ratio = max(drift_ratio) if drift_ratio else math.nan
        if math.isfinite(ratio) and ratio > DRIFT_MAX:
            warn.append({"check": "step_size", "key": "llc.lr",
                         "text": f"SGLD's gradient step is {ratio:.2f}x its noise (above {DRIFT_MAX:g}): the step "
                                 f"size is too large for the loss's curvature, so most steps would be rejected "
                                 f"by a Metropolis test; lower llc.lr"})
        q = trace.shape[1] // 4
        if q >= 2:
            mean = trace.mean(0)
            rise = float(mean[3 * q:].mean() - mean[2 * q:3 * q].mean())
            excess = float(mean.mean()) - init_loss
            if excess > 0 and abs(rise) > DRIFT_REL * excess:
                warn.append({"check": "drifting", "key": "llc.num_draws",
                             "text": f"the loss trace is still moving in its last quarter ({rise:+.3g} vs a mean "
                                     f"excess {excess:.3g}): raise llc.num_draws (or llc.localization)"})
        if float(trace.mean()) < init_loss - 1e-3 * max(abs(init_loss), 1e-3):
            warn.append({"check": "negative", "key": "llc.localization",
                         "text": "the chains found lower loss than the checkpoint (negative LLC): it is not at a "
                                 "local minimum; raise llc.localization to stay near it, or read the value as "
                                 "not meaningful"})
    return {"ok": not warn, "warnings": warn}


class GradNorms:
    """|∇L| of the moving weights at every SGLD step of every chain, for the drift/noise check. Hooks go on each
    chain's own model (devinterp deep-copies the checkpoint per chain; the reference model is never hooked) the first
    time the loss function sees it; a step's norm is read when the next step's loss is computed. (devinterp's own
    ``save_metrics`` decomposes every update and checks it with ``assert_close``: a third of the sampling time.)"""

    def __init__(self, reference: torch.nn.Module, masks: dict | None):
        self.reference, self.masks, self.chains = reference, masks, []

    def watch(self, model: torch.nn.Module) -> None:
        if model is self.reference or not torch.is_grad_enabled():
            return
        state = getattr(model, "_toylens_grad_sq", None)
        if state is None:
            sq: dict[str, Tensor] = {}
            steps: list[float] = []
            for name, p in model.named_parameters():
                if p.requires_grad and (self.masks is None or name in self.masks):
                    m = None if self.masks is None else self.masks[name]
                    m = None if m is None else m.to(p.device, p.dtype)
                    p.register_post_accumulate_grad_hook(
                        lambda p, name=name, m=m: sq.__setitem__(name, (p.grad if m is None else p.grad * m)
                                                                 .double().pow(2).sum()))
            model._toylens_grad_sq = state = (sq, steps)
            self.chains.append(steps)
        sq, steps = state
        if sq:
            steps.append(float(torch.stack(list(sq.values())).sum().sqrt()))
            sq.clear()

    def drift_ratio(self, lr: float, n_beta: float, n_params: int) -> list[float]:
        """Per chain: the median over steps of |ε/2 n·β ∇L| / E|√ε ξ| (E|ξ| = √(moving weights))."""
        noise = math.sqrt(lr * n_params)
        return [float(torch.tensor(c).median()) * 0.5 * lr * n_beta / noise if c else math.nan for c in self.chains]


def watched(loss_fn, meter: GradNorms):
    def wrapped(model, input_ids):
        meter.watch(model)
        return loss_fn(model, input_ids)

    return wrapped
