"""Direct logit attribution (DLA) of the target logit, and the logit lens, as TransformerLens's
``logit_attrs`` and ``accumulated_resid`` compute them. The decomposition and its exactness:
docs/analyses.md, "Direct logit attribution and the logit lens"."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from toylens._compat import HookedTransformer
from toylens.analyze import plots
from toylens.data.base import Batch
from toylens.model.build import positional_embedding_type
from toylens.model.unembed import Unembed, logit_directions
from toylens.result import Result


def _check_linear_unembed(model: HookedTransformer) -> None:
    if (model.cfg.output_logits_soft_cap or 0) > 0:
        raise ValueError("logit attribution needs a linear unembed; this model soft-caps its logits")


def component_labels(model: HookedTransformer) -> list[str]:
    """DLA component labels in residual order (see the module docstring)."""
    labels = ["embed"]
    if positional_embedding_type(model) == "standard":
        labels.append("pos_embed")
    for layer in range(model.cfg.n_layers):
        labels += [f"L{layer}H{h}" for h in range(model.cfg.n_heads)]
        if not model.cfg.attn_only:
            labels.append(f"{layer}_mlp_out")
    return labels + ["bias"]


class TokenDLA(NamedTuple):
    dla: Float[Tensor, "component batch pos"]
    labels: list[str]
    logit_bias: Float[Tensor, "batch pos"]
    target_logit: Float[Tensor, "batch pos"]


@torch.no_grad()
def dla_per_token(model: HookedTransformer, tokens: Int[Tensor, "batch pos"],
                  targets: Int[Tensor, "batch pos"], relative_to_mean: bool = False) -> TokenDLA:
    """DLA of ``targets`` at every position of one chunk of rows (see the module docstring)."""
    _check_linear_unembed(model)
    n_layers, has_pos = model.cfg.n_layers, positional_embedding_type(model) == "standard"
    names = {"hook_embed", "ln_final.hook_scale"} | {f"blocks.{i}.attn.hook_z" for i in range(n_layers)}
    if has_pos:
        names.add("hook_pos_embed")
    if not model.cfg.attn_only:
        names |= {f"blocks.{i}.hook_mlp_out" for i in range(n_layers)}
    logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)

    if relative_to_mean:
        logits = logits - logits.mean(-1, keepdim=True)
    target_logit = logits.gather(-1, targets[..., None])[..., 0]
    direction, logit_bias = logit_directions(model, targets, relative_to_mean)  # [batch, pos, d_model]
    if "ln_final.hook_scale" in cache.cache_dict:
        direction = direction / cache["ln_final.hook_scale"]

    def project(x: Tensor) -> Tensor:
        return einops.einsum(x, direction, "batch pos d_model, batch pos d_model -> batch pos")

    parts = [project(cache["hook_embed"])]
    if has_pos:
        parts.append(project(cache["hook_pos_embed"]))
    for layer in range(n_layers):
        z, W_O = cache[f"blocks.{layer}.attn.hook_z"], model.blocks[layer].attn.W_O
        parts += list(einops.einsum(
            z, W_O, direction,
            "batch pos head_index d_head, head_index d_head d_model, batch pos d_model"
            " -> head_index batch pos"))
        if not model.cfg.attn_only:
            parts.append(project(cache[f"blocks.{layer}.hook_mlp_out"]))
    bias = model.accumulated_bias(n_layers, include_mlp_biases=False).to(direction.dtype)
    parts.append(project(bias.expand_as(direction)))
    return TokenDLA(torch.stack(parts), component_labels(model), logit_bias, target_logit)


@dataclass
class DLAResult(Result):
    """Direct logit attribution of the target logit, averaged over the loss-masked positions.

    ``mean``: per component ``[component]``; ``per_pos``: ``[component, pos]`` averaged over the rows
    where that position is masked (NaN where it never is). ``target_logit_mean`` and
    ``logit_bias_mean`` close the identity: ``mean.sum() + logit_bias_mean == target_logit_mean``.
    """

    labels: list[str]
    mean: Float[Tensor, " component"]
    per_pos: Float[Tensor, "component pos"]
    target_logit_mean: float
    logit_bias_mean: float
    relative_to_mean: bool
    normalization_type: str | None
    n_positions: int

    def figures(self) -> dict:
        what = "target logit - mean logit" if self.relative_to_mean else "target logit"
        return {
            "dla/components": plots.bar(
                self.mean, labels=self.labels, yaxis=what,
                title=f"Direct logit attribution ({what}), mean over masked positions"),
            "dla/per_pos": plots.line(self.per_pos, labels=self.labels, xaxis="pos", yaxis=what,
                                      title="Direct logit attribution per position"),
        }


def direct_logit_attribution(model: HookedTransformer, batch: Batch, relative_to_mean: bool = False,
                             chunk_size: int = 250, progress: bool = False) -> DLAResult:
    """DLA of ``batch.targets`` per component, over the positions where ``batch.loss_mask``."""
    batch = batch.to(model.cfg.device)
    total = count = per_pos = pos_count = None
    logit_sum = bias_sum = 0.0
    for start in tqdm(range(0, len(batch), chunk_size), disable=not progress, desc="dla"):
        rows = batch[start:start + chunk_size]
        out = dla_per_token(model, rows.tokens, rows.targets, relative_to_mean)
        mask = rows.loss_mask.to(out.dla.dtype)
        if total is None:
            total, per_pos = torch.zeros(len(out.labels)), torch.zeros(len(out.labels), mask.shape[1])
            count, pos_count = 0.0, torch.zeros(mask.shape[1])
        total += (out.dla * mask).sum(dim=(1, 2)).cpu()
        per_pos += (out.dla * mask).sum(1).cpu()
        pos_count += mask.sum(0).cpu()
        count += float(mask.sum())
        logit_sum += float((out.target_logit * mask).sum())
        bias_sum += float((out.logit_bias * mask).sum())
    n = max(count, 1.0)
    return DLAResult(
        labels=component_labels(model), mean=total / n,
        per_pos=torch.where(pos_count > 0, per_pos / pos_count.clamp(min=1), float("nan")),
        target_logit_mean=logit_sum / n, logit_bias_mean=bias_sum / n, relative_to_mean=relative_to_mean,
        normalization_type=model.cfg.normalization_type, n_positions=int(count),
    )


@dataclass
class LogitLensResult(Result):
    """Loss and accuracy on the batch's masked targets when decoding each residual stage.

    ``labels``: ``{layer}_pre`` per layer then ``final_post`` (as ``cache.accumulated_resid``).
    ``loss``/``accuracy``: ``[stage]``; ``loss_per_pos``: ``[stage, pos]`` (NaN where never masked).
    ``model_loss``: the model's own loss on the batch (equals ``loss[-1]``).
    """

    labels: list[str]
    loss: Float[Tensor, " stage"]
    accuracy: Float[Tensor, " stage"]
    loss_per_pos: Float[Tensor, "stage pos"]
    model_loss: float
    n_positions: int

    def figures(self) -> dict:
        return {
            "logit_lens/loss": plots.line(
                self.loss, labels=["loss"], xaxis="stage", yaxis="loss",
                title="Logit lens: loss per residual stage (" + ", ".join(self.labels) + ")"),
            "logit_lens/accuracy": plots.bar(self.accuracy, labels=self.labels, yaxis="accuracy",
                                             title="Logit lens: accuracy per residual stage"),
            "logit_lens/loss_per_pos": plots.heatmap(
                self.loss_per_pos, y_labels=self.labels, diverging=False, xaxis="pos", yaxis="stage",
                title="Logit lens: loss per position"),
        }


@torch.no_grad()
def logit_lens(model: HookedTransformer, batch: Batch, chunk_size: int = 250,
               progress: bool = False) -> LogitLensResult:
    """Decode ``resid_pre`` of each layer and the final ``resid_post`` with ``ln_final`` + unembed."""
    _check_linear_unembed(model)
    batch = batch.to(model.cfg.device)
    n_layers, n_pos = model.cfg.n_layers, batch.tokens.shape[1]
    names = [f"blocks.{i}.hook_resid_pre" for i in range(n_layers)]
    names.append(f"blocks.{n_layers - 1}.hook_resid_post")
    labels = [f"{i}_pre" for i in range(n_layers)] + ["final_post"]
    nll = torch.zeros(len(names), n_pos, dtype=torch.float64)
    correct = torch.zeros(len(names), dtype=torch.float64)
    count = torch.zeros(n_pos, dtype=torch.float64)
    model_nll = 0.0
    unembed = Unembed(model)
    for start in tqdm(range(0, len(batch), chunk_size), disable=not progress, desc="logit lens"):
        rows = batch[start:start + chunk_size]
        logits, cache = model.run_with_cache(rows.tokens, names_filter=lambda name: name in names)
        mask = rows.loss_mask.double()
        count += mask.sum(0).cpu()
        model_nll += float((-logits.log_softmax(-1).gather(-1, rows.targets[..., None])[..., 0] * mask).sum())
        for i, name in enumerate(names):
            stage_logits = unembed(cache[name])  # ln_final's statistics recomputed per stage
            logp = stage_logits.log_softmax(-1).gather(-1, rows.targets[..., None])[..., 0]
            nll[i] += (-logp.double() * mask).sum(0).cpu()
            correct[i] += float(((stage_logits.argmax(-1) == rows.targets).double() * mask).sum())
    n = count.sum().clamp(min=1)
    return LogitLensResult(
        labels=labels, loss=(nll.sum(1) / n).float(), accuracy=(correct / n).float(),
        loss_per_pos=torch.where(count > 0, nll / count.clamp(min=1), float("nan")).float(),
        model_loss=model_nll / float(n), n_positions=int(count.sum()),
    )
