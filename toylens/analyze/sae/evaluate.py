"""How good an SAE is on a toylens model: reconstruction (MSE, explained variance, L0, latent density) and
the task's cross-entropy with the SAE's reconstruction spliced into the forward pass (CE loss recovered)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

CHUNK_ROWS = 256  # forward passes in chunks (long batches spend their time allocating)


def task_ce(logits: Float[Tensor, "batch pos d_vocab"], targets: Int[Tensor, "batch pos"],
            loss_mask: Tensor) -> Tensor:
    """The task's loss: cross-entropy of ``targets`` where ``loss_mask`` is true (summed, not averaged)."""
    logp = F.log_softmax(logits.float(), -1)
    nll = -logp.gather(-1, targets[..., None])[..., 0]
    return nll[loss_mask].sum()


def splice_hook(sae, mode: str = "sae", latent: int | None = None):
    """A TransformerLens hook function that replaces the activation: ``sae`` by the SAE's reconstruction
    ``sae.decode(sae.encode(x))``; ``zero`` by zeros; ``ablate`` by ``x`` minus latent ``latent``'s
    contribution ``f_latent(x) * W_dec[latent]`` (the rest of the SAE and its error left in place)."""

    def hook(act, hook):  # noqa: ARG001
        if mode == "zero":
            return torch.zeros_like(act)
        if mode == "ablate":
            f = sae.encode(act)[..., latent]
            return act - f[..., None] * sae.W_dec[latent]
        return sae.decode(sae.encode(act)).to(act.dtype)

    return hook


@torch.no_grad()
def spliced_loss(model, sae, hook_name: str, batch, mode: str = "clean", latent: int | None = None) -> float:
    """Mean task loss over ``batch``'s masked positions with the hook's activation replaced (``mode``:
    ``clean`` nothing, ``sae``, ``zero``, ``ablate``; see ``splice_hook``)."""
    total, n = 0.0, int(batch.loss_mask.sum())
    hooks = [] if mode == "clean" else [(hook_name, splice_hook(sae, mode, latent))]
    for i in range(0, len(batch), CHUNK_ROWS):
        b = batch[i:i + CHUNK_ROWS]
        logits = model.run_with_hooks(b.tokens, fwd_hooks=hooks)
        total += float(task_ce(logits, b.targets, b.loss_mask))
    return total / max(n, 1)


def ce_loss_recovered(ce_clean: float, ce_spliced: float, ce_zero: float) -> float:
    """(CE_zero_ablation - CE_spliced) / (CE_zero_ablation - CE_clean): 1 when the reconstruction is as good as
    the real activation, 0 when it is as bad as zeros (NaN when zeroing the hook does not change the loss)."""
    gap = ce_zero - ce_clean
    return (ce_zero - ce_spliced) / gap if abs(gap) > 1e-12 else float("nan")


@torch.no_grad()
def hook_activations(model, hook_name: str, tokens: Tensor) -> Tensor:
    """The hook's activations on ``tokens`` [n, pos] -> [n, pos, d]."""
    out = []

    def grab(act, hook):  # noqa: ARG001
        out.append(act.detach().clone())

    for i in range(0, len(tokens), CHUNK_ROWS):
        model.run_with_hooks(tokens[i:i + CHUNK_ROWS], fwd_hooks=[(hook_name, grab)], return_type=None)
    return torch.cat(out)


@dataclass
class SAEEval:
    """Numbers of one SAE on held-out task sequences (raw, un-normalized activations)."""

    n_activations: int
    mse: float  # mean squared error per element
    explained_variance: float  # 1 - sum |x - x_hat|^2 / sum |x - mean x|^2
    l0: float  # mean number of active latents per activation
    dead_latents: int  # latents that never fire on the evaluation sequences
    ce_clean: float
    ce_spliced: float
    ce_zero_ablation: float
    ce_loss_recovered: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def latent_acts(sae, acts: Tensor) -> Tensor:
    """Latent activations [..., d_sae] of activations [..., d_in], in chunks."""
    flat = acts.reshape(-1, acts.shape[-1])
    out = torch.cat([sae.encode(flat[i:i + 65536]) for i in range(0, len(flat), 65536)])
    return out.reshape(*acts.shape[:-1], -1)


@torch.no_grad()
def evaluate_sae(model, sae, hook_name: str, batch, acts: Tensor | None = None,
                 feats: Tensor | None = None) -> SAEEval:
    """Reconstruction and CE numbers of ``sae`` on ``batch`` (a task ``Batch``)."""
    acts = hook_activations(model, hook_name, batch.tokens) if acts is None else acts
    feats = latent_acts(sae, acts) if feats is None else feats
    x = acts.reshape(-1, acts.shape[-1]).float()
    f = feats.reshape(-1, feats.shape[-1])
    x_hat = sae.decode(f).float()
    err = (x_hat - x).pow(2).sum(-1)
    var = (x - x.mean(0)).pow(2).sum(-1)
    ce_clean = spliced_loss(model, sae, hook_name, batch, "clean")
    ce_sae = spliced_loss(model, sae, hook_name, batch, "sae")
    ce_zero = spliced_loss(model, sae, hook_name, batch, "zero")
    return SAEEval(
        n_activations=len(x), mse=float(err.mean() / x.shape[-1]),
        explained_variance=float(1 - err.sum() / var.sum()), l0=float((f > 0).float().sum(-1).mean()),
        dead_latents=int(((f > 0).sum(0) == 0).sum()), ce_clean=ce_clean, ce_spliced=ce_sae,
        ce_zero_ablation=ce_zero, ce_loss_recovered=ce_loss_recovered(ce_clean, ce_sae, ce_zero))


def latent_density(feats: Tensor) -> Tensor:
    """Fraction of activations on which each latent fires [d_sae]."""
    f = feats.reshape(-1, feats.shape[-1])
    return (f > 0).float().mean(0)
