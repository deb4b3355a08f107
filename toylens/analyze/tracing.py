"""Causal tracing (ROME): noise the embeddings of some positions, then restore one clean state at a time.

    result = causal_trace(model, tokens, answer_pos, answer_tokens, noise_positions=[1, 2, 3])

Rows, metric and why the batched sweep is exact: docs/analyses.md, "Causal tracing"."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from toylens._compat import HookedTransformer
from toylens.analyze import plots
from toylens.model.unembed import Unembed
from toylens.result import Result

KINDS = ("resid", "attn", "mlp")
METRICS = ("prob", "logprob")
_COLORS = {"resid": "Purples", "attn": "Reds", "mlp": "Greens"}  # ROME's figure colours
_BLOCK_HOOK = re.compile(r"blocks\.(\d+)\.(.+)")
Restore = Sequence[tuple[str, int]]  # one restore set: (hook name, pos) pairs written together


class TracingError(ValueError):
    """Tracing inputs that cannot work; the message names the argument and the fix."""


def default_sigma(model: HookedTransformer) -> float:
    """ROME's noise level: 3 x the empirical standard deviation of the token embeddings."""
    return 3.0 * float(model.W_E.detach().float().std())


def noise_samples(model: HookedTransformer, mask: Bool[Tensor, "batch pos"], n_samples: int, sigma: float,
                  seed: int) -> Float[Tensor, "sample batch pos d_model"]:
    """Seeded Gaussian noise of std ``sigma`` where ``mask`` is true, zero elsewhere (drawn on the CPU,
    so the same seed gives the same noise on every device)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n_samples, *mask.shape, model.cfg.d_model, generator=gen)
    noise = noise.to(model.cfg.device) * sigma
    return noise * mask.to(noise.device)[None, :, :, None].to(noise.dtype)


def rows_for_kind(model: HookedTransformer, kind: str, window: int = 1) -> tuple[list[str], list[list[str]]]:
    """(row labels, hooks restored together for each row) of one kind; see the module docstring."""
    n_layers = model.cfg.n_layers
    if kind == "resid":
        hooks = ["blocks.0.hook_resid_pre"] + [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)]
        return hooks, [[h] for h in hooks]
    suffix = {"attn": "hook_attn_out", "mlp": "hook_mlp_out"}[kind]
    labels, groups = [], []
    for layer in range(n_layers):
        lo, hi = max(0, layer - window // 2), min(n_layers, layer - (-window // 2))
        labels.append(f"blocks.{layer}.{suffix}")
        groups.append([f"blocks.{w}.{suffix}" for w in range(lo, hi)])
    return labels, groups


def _resume_layer(hook: str, n_layers: int) -> int:
    """The block a run with ``hook`` restored can start from (resid_post l is block l+1's input)."""
    m = _BLOCK_HOOK.fullmatch(hook)
    if m is None:
        raise TracingError(f"restore hook {hook!r}: only hooks inside blocks (blocks.{{l}}.*) can be restored")
    layer, name = int(m[1]), m[2]
    if layer >= n_layers:
        raise TracingError(f"restore hook {hook!r}: the model has {n_layers} layers")
    if name.endswith(("hook_pattern", "hook_attn_scores")):
        raise TracingError(f"restore hook {hook!r}: has no pos axis after batch; restore attn.hook_z or hook_attn_out")
    return layer + 1 if name == "hook_resid_post" else layer


def _is_input(hook: str, start: int) -> bool:
    """Whether ``hook`` is the residual stream a run starting at block ``start`` takes as its input."""
    return hook in (f"blocks.{start}.hook_resid_pre", f"blocks.{start - 1}.hook_resid_post")


def _row_bytes(model: HookedTransformer, n_pos: int) -> int:
    """A generous estimate of the float32 memory one row of a forward pass holds at its peak."""
    c = model.cfg
    per_pos = 12 * c.d_model + 4 * c.n_heads * c.d_head + 3 * c.n_heads * n_pos + 3 * (c.d_mlp or 0)
    return 4 * n_pos * per_pos


def answer_metric(model: HookedTransformer, resid: Float[Tensor, "rows pos d_model"], answer_pos: Tensor,
                  answer_tokens: Tensor, metric: str, unembed: Unembed | None = None) -> Float[Tensor, " rows"]:
    """(Log-)probability of ``answer_tokens`` from the final residual stream, unembedding only ``answer_pos``."""
    logits = (unembed or Unembed(model)).at(resid, answer_pos, per_row=True)
    logp = logits.float().log_softmax(-1).gather(-1, answer_tokens[:, None])[:, 0]
    return logp.exp() if metric == "prob" else logp


@torch.no_grad()
def restore_sweep(model: HookedTransformer, tokens: Int[Tensor, "batch pos"], answer_pos: Int[Tensor, " batch"],
                  answer_tokens: Int[Tensor, " batch"], noise: Float[Tensor, "sample batch pos d_model"],
                  restores: Sequence[Restore], *, metric: str = "prob", chunk_budget_mb: float = 256.0,
                  progress: bool = False) -> tuple[Float[Tensor, " restore"], float, float]:
    """The generic primitive: mean metric with each restore set applied to the noised runs.

    ``noise`` is added to ``hook_embed``; each restore set is a list of ``(hook, pos)`` whose clean
    activations are written together. Returns (values ``[restore]``, clean metric, noised metric),
    each a mean over samples and prompts. Hook names are checked here, shapes by ``causal_trace``.
    """
    n_layers, (b, _) = model.cfg.n_layers, tokens.shape
    n_samples = noise.shape[0]
    causal = model.cfg.attention_dir == "causal"
    n_pos = int(answer_pos.max()) + 1 if causal else tokens.shape[1]  # causal: later positions never matter
    tokens, noise = tokens[:, :n_pos], noise[:, :, :n_pos]
    rep = n_samples * b  # noised rows, row s * b + i is sample s of prompt i
    prompt_of = torch.arange(rep, device=tokens.device) % b
    ans_pos, ans_tok = answer_pos[prompt_of], answer_tokens[prompt_of]
    for h in sorted({h for r in restores for h, _ in r}):
        _resume_layer(h, n_layers)  # raises for hooks that cannot be restored
        if h not in model.hook_dict:
            raise TracingError(f"restores: {h!r} is not a hook point of this model; see model.hook_dict")
    # Drop restores that cannot change anything: positions the metric never sees, positions before
    # the first noised one (clean and noised runs agree there), embeddings that were not noised.
    noised_pos = (noise != 0).any(dim=-1).any(dim=0)  # [batch, pos]
    first = int(noised_pos.float().argmax(dim=1).min()) if noised_pos.any() and causal else 0
    embed_noised = noised_pos.any(dim=0).tolist()
    restores = [[(h, p) for h, p in r if first <= p < n_pos
                 and (h != "blocks.0.hook_resid_pre" or embed_noised[p])] for r in restores]
    hooks = sorted({h for r in restores for h, _ in r})
    starts = [min((_resume_layer(h, n_layers) for h, _ in r), default=None) for r in restores]
    needed_starts = sorted({s for s in starts if s is not None})
    budget_rows = max(1, int(chunk_budget_mb * 2**20 // _row_bytes(model, n_pos)))

    # clean run: the activations to restore and the clean metric
    clean = _run_and_grab(model, tokens, None, hooks, budget_rows)
    unembed = Unembed(model)
    clean_value = answer_metric(model, clean.pop("final"), answer_pos, answer_tokens, metric, unembed).mean()
    # noised runs: the residual stream entering each block a group resumes from
    noised_grab = [_resume_hook(s, n_layers) for s in needed_starts]
    noised = _run_and_grab(model, tokens.repeat(n_samples, 1), noise.reshape(rep, n_pos, -1), noised_grab,
                           budget_rows)
    noised_metric = answer_metric(model, noised.pop("final"), ans_pos, ans_tok, metric, unembed)
    noised_value = float(noised_metric.mean())

    values = torch.full((len(restores),), noised_value, dtype=torch.float64)
    jobs = [(s, [i for i, si in enumerate(starts) if si == s]) for s in needed_starts]
    total = sum(len(idx) * rep for _, idx in jobs)
    bar = tqdm(total=total, disable=not progress, desc="causal trace", unit="row")
    for start, idx in jobs:
        x_all = noised[_resume_hook(start, n_layers)]  # [rep, n_pos, d_model]
        # which positions each restore set writes, per hook: [n_sets, n_pos] bool
        writes = {h: torch.zeros(len(idx), n_pos, dtype=torch.bool, device=tokens.device) for h in hooks}
        for j, i in enumerate(idx):
            for h, p in restores[i]:
                writes[h][j, p] = True
        writes = {h: w for h, w in writes.items() if w.any()}
        sums = torch.zeros(len(idx), dtype=torch.float64, device=tokens.device)
        for lo in range(0, len(idx) * rep, budget_rows):
            rows = torch.arange(lo, min(lo + budget_rows, len(idx) * rep), device=tokens.device)
            set_of, noised_row = rows // rep, rows % rep
            prompt = noised_row % b

            def write(act: Tensor, hook, set_of=set_of, prompt=prompt, writes=writes) -> Tensor:
                sel = writes[hook.name][set_of].view(*set_of.shape, n_pos, *([1] * (act.ndim - 2)))
                return torch.where(sel, clean[hook.name][prompt].to(act.dtype), act)

            x = x_all[noised_row]
            fwd_hooks = []
            for h in writes:
                if _is_input(h, start):
                    x = write(x, _Named(h))
                else:
                    fwd_hooks.append((h, write))
            with model.hooks(fwd_hooks=fwd_hooks):
                resid = model(x, start_at_layer=start, stop_at_layer=n_layers) if start < n_layers else x
            m = answer_metric(model, resid, ans_pos[noised_row], ans_tok[noised_row], metric, unembed)
            sums.index_add_(0, set_of, m.double())
            bar.update(len(rows))
        values[idx] = (sums / rep).cpu()
    bar.close()
    return values.float(), float(clean_value), noised_value


class _Named:
    """Stands in for a HookPoint when a restore is applied to a run's input directly."""

    def __init__(self, name: str):
        self.name = name


def _resume_hook(start: int, n_layers: int) -> str:
    return f"blocks.{start}.hook_resid_pre" if start < n_layers else f"blocks.{n_layers - 1}.hook_resid_post"


def _run_and_grab(model: HookedTransformer, tokens: Tensor, noise: Tensor | None, hooks: Sequence[str],
                  chunk_rows: int) -> dict[str, Tensor]:
    """Forward ``tokens`` (noise added to ``hook_embed``) in chunks; returns the activations at ``hooks``
    and ``"final"``: the residual stream after the last block."""
    out: dict[str, list[Tensor]] = {h: [] for h in [*hooks, "final"]}
    n_layers = model.cfg.n_layers
    for lo in range(0, tokens.shape[0], chunk_rows):
        grabbed: dict[str, Tensor] = {}

        def grab(act: Tensor, hook, grabbed=grabbed) -> None:
            grabbed[hook.name] = act.detach().clone()

        fwd = [(h, grab) for h in hooks]
        if noise is not None:
            chunk_noise = noise[lo:lo + chunk_rows]
            fwd.insert(0, ("hook_embed", lambda act, hook, z=chunk_noise: act + z.to(act.dtype)))
        with model.hooks(fwd_hooks=fwd):
            final = model(tokens[lo:lo + chunk_rows], stop_at_layer=n_layers)
        for h in hooks:
            out[h].append(grabbed[h])
        out["final"].append(final)
    return {h: torch.cat(v) for h, v in out.items()}


@dataclass
class TracingResult(Result):
    """Causal-tracing values per kind, ``values[kind]``: ``[layer, pos]`` (rows: ``row_labels[kind]``).

    ``clean``/``noised``: the metric without noise / with noise and nothing restored; a restore
    that brings the metric back towards ``clean`` marks a state that carries the answer.
    """

    values: dict[str, Float[Tensor, "layer pos"]]
    row_labels: dict[str, list[str]]
    pos_labels: list[str]
    clean: float
    noised: float
    metric: str
    noise_positions: list[int]  # positions noised in at least one prompt
    sigma: float
    n_samples: int
    window: int
    seed: int
    n_prompts: int

    def peaks(self) -> dict[str, dict]:
        """Per kind, the restore that recovers the most: its hook, position and value."""
        out = {}
        for kind, v in self.values.items():
            i = int(v.argmax())
            row, pos = divmod(i, v.shape[1])
            out[kind] = {"hook": self.row_labels[kind][row], "pos": pos, "value": float(v[row, pos])}
        return out

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["peaks"] = self.peaks()
        return d

    def figures(self) -> dict:
        figs = {}
        ylab = [f"{lab}*" if i in self.noise_positions else lab for i, lab in enumerate(self.pos_labels)]
        what = "p" if self.metric == "prob" else "log p"
        for kind, v in self.values.items():
            rows = self.row_labels[kind]
            xlab = ["embed" if r.endswith("hook_resid_pre") else r.split(".")[1] for r in rows]
            lo = min(self.noised, float(v.min()))
            hi = max(self.clean, float(v.max()))
            win = f" (window {self.window})" if self.window > 1 and kind != "resid" else ""
            fig = plots.heatmap(v.T, x_labels=xlab, y_labels=ylab, diverging=False, zmin=lo, zmax=hi,
                                title=f"Restoring {kind}{win}: {what}(answer), clean {self.clean:.3g}, "
                                      f"noised {self.noised:.3g} (* noised positions)",
                                xaxis="layer", yaxis="pos")
            fig.update_traces(colorscale=_COLORS[kind])
            figs[f"tracing/{kind}"] = fig
        return figs


def _check(model: HookedTransformer, tokens, answer_pos, answer_tokens, noise_positions, kinds, window,
           n_samples, sigma, metric) -> Tensor:
    """Validate the inputs of ``causal_trace``; returns the noise mask ``[batch, pos]``."""
    if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.dtype != torch.long:
        raise TracingError("tokens: expected int64 token ids [batch, pos]; convert with .long() or add a batch dim")
    b, n = tokens.shape
    if n > model.cfg.n_ctx:
        raise TracingError(f"tokens: {n} positions exceed the model's n_ctx={model.cfg.n_ctx}; shorten the prompts")
    if not isinstance(answer_pos, Tensor) or answer_pos.shape != (b,):
        raise TracingError(f"answer_pos: expected one position per prompt, shape ({b},)")
    if ((answer_pos < 0) | (answer_pos >= n)).any():
        raise TracingError(f"answer_pos: values must lie in [0, {n}); got {answer_pos.min()}..{answer_pos.max()}")
    if not isinstance(answer_tokens, Tensor) or answer_tokens.shape != (b,):
        raise TracingError(f"answer_tokens: expected one token id per prompt, shape ({b},) (answers[:, 0, 0])")
    if ((answer_tokens < 0) | (answer_tokens >= model.cfg.d_vocab_out)).any():
        raise TracingError(f"answer_tokens: ids must lie in [0, d_vocab_out={model.cfg.d_vocab_out})")
    if isinstance(noise_positions, Tensor) and noise_positions.dtype == torch.bool:
        if noise_positions.shape != (b, n):
            raise TracingError(f"noise_positions: a bool mask must have the tokens' shape ({b}, {n})")
        mask = noise_positions.to(tokens.device)
    else:
        pos = [int(p) for p in noise_positions]
        if any(not -n <= p < n for p in pos):
            raise TracingError(f"noise_positions: {pos} must index into the {n} positions")
        mask = torch.zeros(b, n, dtype=torch.bool, device=tokens.device)
        mask[:, pos] = True
    if not mask.any():
        raise TracingError("noise_positions: nothing to noise; name at least one position (e.g. the subject's)")
    for kind in kinds:
        if kind not in KINDS:
            raise TracingError(f"kinds: unknown kind {kind!r}; choose from {KINDS}")
        if kind == "mlp" and model.cfg.attn_only:
            raise TracingError("kinds: 'mlp' needs MLP layers, this model is attn_only; drop 'mlp' from kinds")
    if not kinds:
        raise TracingError(f"kinds: name at least one of {KINDS}")
    if int(window) < 1:
        raise TracingError(f"window={window}: must be at least 1 (ROME uses 10 for large models)")
    if int(n_samples) < 1:
        raise TracingError(f"n_samples={n_samples}: must be at least 1")
    if sigma is not None and not (math.isfinite(sigma) and sigma > 0):
        raise TracingError(f"sigma={sigma}: must be a positive number (None: 3 x std of W_E)")
    if metric not in METRICS:
        raise TracingError(f"metric={metric!r}: choose from {METRICS}")
    if model.cfg.positional_embedding_type == "shortformer":
        raise TracingError("model: shortformer positional embeddings are not supported by causal_trace")
    return mask


@torch.no_grad()
def causal_trace(model: HookedTransformer, tokens: Int[Tensor, "batch pos"], answer_pos: Int[Tensor, " batch"],
                 answer_tokens: Int[Tensor, " batch"], noise_positions: Sequence[int] | Bool[Tensor, "batch pos"],
                 *, kinds: Sequence[str] | None = None, window: int = 1, n_samples: int = 10,
                 sigma: float | None = None, seed: int = 0, metric: str = "prob", chunk_budget_mb: float = 256.0,
                 pos_labels: Sequence[str] | None = None, progress: bool = True) -> TracingResult:
    """ROME's causal trace of ``model`` on ``tokens`` for every (layer, pos) and kind.

    ``noise_positions``: positions noised in every prompt, or a bool mask ``[batch, pos]``.
    ``kinds``: default ``("resid", "attn", "mlp")`` (no ``mlp`` for attn-only models).
    ``sigma``: noise std, default ``3 * W_E.std()``. ``metric``: ``"prob"`` or ``"logprob"`` of
    ``answer_tokens`` at ``answer_pos``. ``pos_labels``: axis labels (default ``"{pos}"``).
    """
    if kinds is None:
        kinds = ("resid", "attn") if model.cfg.attn_only else KINDS
    kinds = tuple(kinds)
    device = model.cfg.device
    tokens = tokens.to(device) if isinstance(tokens, Tensor) else tokens
    answer_pos = answer_pos.to(device) if isinstance(answer_pos, Tensor) else answer_pos
    answer_tokens = answer_tokens.to(device) if isinstance(answer_tokens, Tensor) else answer_tokens
    mask = _check(model, tokens, answer_pos, answer_tokens, noise_positions, kinds, window, n_samples, sigma, metric)
    n = tokens.shape[1]
    if pos_labels is not None and len(pos_labels) != n:
        raise TracingError(f"pos_labels: {len(pos_labels)} labels for {n} positions")
    sigma = default_sigma(model) if sigma is None else float(sigma)
    noise = noise_samples(model, mask, n_samples, sigma, seed)

    restores, where = [], {}
    labels = {}
    for kind in kinds:
        labels[kind], groups = rows_for_kind(model, kind, window)
        where[kind] = len(restores)
        restores += [[(h, p) for h in group] for group in groups for p in range(n)]
    flat, clean, noised = restore_sweep(model, tokens, answer_pos, answer_tokens, noise, restores, metric=metric,
                                        chunk_budget_mb=chunk_budget_mb, progress=progress)
    values = {k: flat[where[k]:where[k] + len(labels[k]) * n].view(len(labels[k]), n) for k in kinds}
    return TracingResult(
        values=values, row_labels=labels,
        pos_labels=list(pos_labels) if pos_labels is not None else [str(i) for i in range(n)],
        clean=clean, noised=noised, metric=metric,
        noise_positions=sorted(int(p) for p in mask.any(0).nonzero()[:, 0]),
        sigma=sigma, n_samples=int(n_samples), window=int(window), seed=int(seed), n_prompts=tokens.shape[0])
