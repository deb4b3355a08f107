"""The engine behind ``ablate_every_hook``: one generic primitive plus what makes it fast, exactly.

The primitive is :func:`run_patched`: run the model on one chunk of rows, *from the block that
contains hook H*, with the activation at H replaced by ``f(clean activation)``, and return the
summed cross-entropy and the number of correct argmaxes on the loss-masked positions. The
modes (mean, zero, resample) are small replacement functions; everything else is a plan saying
where to resume and which values are dead.

Why each trick is exact (the naive loop, one ``run_with_hooks`` per hook on the whole batch, is
the oracle the tests compare against):

* Resume at a block boundary. The model is a stack of blocks, so the clean forward pass up to
  block l is identical with or without an ablation inside block l. We keep, per chunk, the clean
  residual stream entering every block and re-run only from the hook's block
  (``HookedTransformer.forward(start_at_layer=l)``); inside that block the hook is patched
  with TransformerLens's own hook, so its semantics (e.g. ``ln1`` hooks firing once for each of
  q, k and v, ``hook_attn_scores`` after the causal mask) are TransformerLens's.
* One row for batch-constant values. A mean or zero replacement is the same for every row: the
  hook returns a single row and the following operations broadcast it, so everything that depends
  only on it (the whole rest of the model after a ``hook_resid_*`` ablation) runs on one row.
* Dead values on one row. When H is replaced whole, what only fed H is computed for nothing
  (the attention before a ``hook_z``/``hook_attn_out`` ablation, the MLP before ``mlp.hook_post``).
  Those upstream hook points are cut to one row, so that work shrinks to one row; when the
  block's attention half is dead but its output is needed, the clean ``hook_resid_mid`` cached
  for the chunk is put back. The positional embedding is the same in every row (no padding), so
  it is cut to one row too.
* Chunks of ``chunk_rows`` rows, and only the loss: log-sum-exp and the target's logit per chunk,
  at the positions some row's ``loss_mask`` selects; full logits of the batch never exist.

These tricks are used only for plain sequential blocks (``fast_path_ok``); other architectures
get the same resumed, chunked loop with the replacement broadcast to full size.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from toylens._compat import HookedTransformer
from toylens.data.base import Batch

MODES = ("mean", "zero", "resample")
HEAD_LABEL = re.compile(r"L(?P<layer>\d+)H(?P<head>\d+)")

# How a job on a hook point of a block (the suffix after "blocks.{l}.") is run, on the fast path.
# Replacing a residual-stream hook severs the run from everything before it: start from one row.
_SEVERING = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")
# After the attention half only hook_resid_mid flows on: start from one row and put the clean
# hook_resid_mid of the chunk back, so ln1 and the attention run on one row.
_AFTER_ATTENTION = ("ln2.hook_scale", "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out")
# Upstream hook points (same block) that only feed the replaced one: cut to one row.
_DEAD_UPSTREAM: dict[str, tuple[str, ...]] = {
    "attn.hook_z": ("ln1.hook_normalized",),  # q, k, v and the pattern only feed z
    "attn.hook_result": ("ln1.hook_normalized",),
    "hook_attn_out": ("ln1.hook_normalized",),
    "mlp.hook_pre": ("ln2.hook_normalized",),
    "mlp.hook_post": ("ln2.hook_normalized",),
    "hook_mlp_out": ("ln2.hook_normalized",),
}
# Outside the blocks: replacing these severs the run from its input as well (the positional
# embedding, the other input of the first residual, is the same in every row).
_SEVERING_OUTSIDE = ("hook_embed", "ln_final.hook_normalized", "unembed.hook_in", "unembed.hook_out")


@dataclasses.dataclass(frozen=True)
class Job:
    """One ablation: which hook point is replaced, and how the run is planned."""

    label: str  # hook name, or "L{l}H{h}" for a single head
    hook: str  # the hook point whose activation is replaced
    head: int | None  # replace only ``hook_z[:, :, head]``
    start: int | None  # None: from the tokens; l: from block l's clean resid_pre (n_layers: the end)
    one_row_input: bool = False  # the run's input is dead: start from its first row only
    one_row: tuple[str, ...] = ()  # dead hook points cut to one row
    clean: tuple[str, ...] = ()  # hook points whose clean chunk value is put back


@dataclasses.dataclass
class Totals:
    """Sums over chunks: summed NLL over masked positions, masked positions, correct argmaxes."""

    nll: Tensor | float = 0.0  # tensors until the end: no device sync per chunk
    correct: Tensor | int = 0
    n: int = 0

    def add(self, nll: Tensor, correct: Tensor, n: int) -> None:
        self.nll = self.nll + nll
        self.correct = self.correct + correct
        self.n += n

    @property
    def loss(self) -> float:
        return float(self.nll) / self.n if self.n else float("nan")

    @property
    def accuracy(self) -> float:
        return float(self.correct) / self.n if self.n else float("nan")


# --- which hooks, and how to run each ------------------------------------------------------------
def fast_path_ok(model: HookedTransformer) -> bool:
    """Plain sequential pre-norm blocks with a plain MLP: the one-row tricks are known exact there."""
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    c = model.cfg
    return (c.positional_embedding_type in ("standard", "rotary") and not c.parallel_attn_mlp
            and not c.use_attn_in and not c.use_split_qkv_input and not c.use_hook_mlp_in
            and not c.use_normalization_before_and_after and not c.gated_mlp and c.num_experts is None
            and not c.use_qk_norm and c.original_architecture not in POST_NORM_ARCHITECTURES)


def firing_order(model: HookedTransformer, tokens: Tensor) -> list[str]:
    """Names of the hook points that fire in a forward pass, in the order they first fire."""
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens[:1])
    return list(cache.keys())


def plan_jobs(model: HookedTransformer, labels: Sequence[str], order: Sequence[str], fast: bool) -> list[Job]:
    """A Job for each label (hook name or head label), given the hook points' firing order."""
    n_layers = model.cfg.n_layers
    fired = set(order)
    first_block = next((i for i, n in enumerate(order) if n.startswith("blocks.")), len(order))
    starts_from_tokens = model.cfg.positional_embedding_type == "shortformer"  # needs pos per block
    jobs = []
    for label in labels:
        head = None
        m = HEAD_LABEL.fullmatch(label)
        if m:
            head = int(m["head"])
            hook = f"blocks.{m['layer']}.attn.hook_z"
        else:
            hook = label
        one_row: list[str] = []
        clean: list[str] = []
        one_row_input = False
        if hook.startswith("blocks."):
            start: int | None = int(hook.split(".")[1])
            suffix = hook.split(".", 2)[2]
            if fast and head is None:
                one_row += [f"blocks.{start}.{s}" for s in _DEAD_UPSTREAM.get(suffix, ())]
                resid_mid = f"blocks.{start}.hook_resid_mid"
                if suffix in _SEVERING:
                    one_row_input = True
                elif suffix in _AFTER_ATTENTION and resid_mid in fired:
                    one_row_input, clean = True, [resid_mid]
        else:
            start = None if order.index(hook) < first_block else n_layers
            one_row_input = fast and hook in _SEVERING_OUTSIDE
        if starts_from_tokens:
            start, one_row_input = None, False
        one_row = [n for n in one_row if n in fired]
        jobs.append(Job(label, hook, head, start, one_row_input, tuple(one_row), tuple(clean)))
    return jobs


# --- replacement values (the modes) --------------------------------------------------------------
class MeanAccumulator:
    """Per-position batch means of hook activations over a reference batch (chunk sums added in float64).

    When a hook point fires several times in one pass (``ln1`` fires for q, k and v) the last
    value counts, as in ``run_with_cache``.
    """

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.sums: dict[str, Tensor] = {}
        self.rows = 0

    def add_chunk(self, model: HookedTransformer, tokens: Tensor) -> None:
        pending: dict[str, Tensor] = {}

        def grab(act: Tensor, hook) -> None:
            pending[hook.name] = act.sum(0)

        with model.hooks(fwd_hooks=[(n, grab) for n in self.names]):
            model(tokens, return_type=None if not any(n.startswith("unembed.") for n in self.names) else "logits")
        for name, s in pending.items():
            s = s.double()
            self.sums[name] = self.sums[name] + s if name in self.sums else s
        self.rows += tokens.shape[0]

    def means(self, dtype: torch.dtype) -> dict[str, Tensor]:
        return {name: (s / self.rows).to(dtype)[None] for name, s in self.sums.items()}


def replacement_fn(mode: str, job: Job, means: dict[str, Tensor] | None,
                   resampled: dict[str, Tensor] | None) -> Callable[[Tensor], Tensor]:
    """f(clean activation) -> new activation for ``job.hook``: a single row when it is batch-constant."""
    if mode == "mean":
        assert means is not None
        mean = means[job.hook]
        return lambda act: mean.clone()  # clone: downstream ops must never write into our means
    if mode == "zero":
        return lambda act: act.new_zeros((1, *act.shape[1:]))
    if mode == "resample":
        assert resampled is not None
        ref = resampled[job.hook]
        return lambda act: ref
    raise ValueError(f"unknown ablation mode {mode!r}; choose from {MODES}")


def resample_rows(n: int, n_ref: int, same_batch: bool, generator: torch.Generator) -> Tensor:
    """Which reference row replaces each of the ``n`` rows (one draw, shared by every hook).

    Same batch: a uniformly random derangement (every row gets another row's activation).
    A separate reference batch: distinct random rows when it has enough, else drawn with replacement.
    """
    dev = generator.device
    if same_batch:
        if n < 2:
            raise ValueError("resample ablation on the batch itself needs at least 2 rows")
        while True:  # rejection: a random permutation has no fixed point with probability ~1/e
            perm = torch.randperm(n, generator=generator, device=dev)
            if not bool((perm == torch.arange(n, device=dev)).any()):
                return perm
    if n_ref >= n:
        return torch.randperm(n_ref, generator=generator, device=dev)[:n]
    return torch.randint(n_ref, (n,), generator=generator, device=dev)


def activations(model: HookedTransformer, tokens: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """Clean activations at ``names`` (the last call wins, as in ``run_with_cache``)."""
    store: dict[str, Tensor] = {}
    with model.hooks(fwd_hooks=[(n, _grab_into(store)) for n in names]):
        model(tokens, return_type="logits" if any(n.startswith("unembed.") for n in names) else None)
    return store


# --- the primitive -------------------------------------------------------------------------------
@dataclasses.dataclass
class Chunk:
    """One chunk of the evaluation batch plus its clean values needed to resume runs."""

    batch: Batch
    positions: slice | Tensor  # positions where some row is loss-masked (logits computed only there)
    resid_pre: list[Tensor]  # clean input of every block, and at index n_layers the final residual
    clean: dict[str, Tensor]  # other clean hook values put back by jobs (hook_resid_mid)


def _masked_positions(mask: Tensor) -> slice | Tensor:
    cols = mask.any(0).nonzero().flatten()
    if len(cols) == 0:
        return slice(0, 0)
    lo, hi = int(cols[0]), int(cols[-1]) + 1
    return slice(lo, hi) if hi - lo == len(cols) else cols


def _select_positions(positions: slice | Tensor):
    def hook(act: Tensor, hook) -> Tensor:
        return act[:, positions]
    return hook


def nll_and_correct(logits: Float[Tensor, "b pos d_vocab"], batch: Batch,
                    positions: slice | Tensor) -> tuple[Tensor, Tensor]:
    """Summed NLL of the targets and number of correct argmaxes over ``loss_mask``.

    ``logits`` cover ``positions`` only, and may have a batch dimension of 1 (batch-constant).
    """
    targets, mask = batch.targets[:, positions], batch.loss_mask[:, positions]
    if logits.shape[0] == 1 and targets.shape[0] != 1:
        # batch-constant logits: one row of log-probs and argmaxes serves every row
        nll = -logits[0].log_softmax(-1).gather(-1, targets.T).T
        correct = logits[0].argmax(-1) == targets
    else:
        idx = targets.unsqueeze(-1)
        nll = -logits.log_softmax(-1).gather(-1, idx).squeeze(-1)
        correct = argmax_is(logits, idx)
    return torch.where(mask, nll, 0.0).sum(dtype=torch.float64), (correct & mask).sum()


def argmax_is(logits: Tensor, idx: Tensor) -> Tensor:
    """``logits.argmax(-1) == idx[..., 0]``, without argmax (ten times slower than amax on CPU).

    The target is the argmax when its logit beats every other one; exact ties and NaNs, where
    argmax's first-index rule decides, take the slow path.
    """
    target = logits.gather(-1, idx)
    logits.scatter_(-1, idx, -math.inf)
    best_other = logits.amax(-1, keepdim=True)
    logits.scatter_(-1, idx, target)  # restore
    if bool((~(target > best_other) & ~(target < best_other)).any()):
        return logits.argmax(-1) == idx.squeeze(-1)
    return (target > best_other).squeeze(-1)


def _grab_into(store: dict[str, Tensor]):
    def hook(act: Tensor, hook) -> None:
        store[hook.name] = act
    return hook


def _put_back(value: Tensor):
    return lambda act, hook: value


def _one_row(act: Tensor, hook) -> Tensor:
    return act[:1]


def clean_chunk(model: HookedTransformer, batch: Batch, clean_names: Sequence[str]) -> tuple[Chunk, Tensor, Tensor]:
    """Clean pass over one chunk: the values runs resume from, and the clean NLL / correct counts."""
    n_layers = model.cfg.n_layers
    store: dict[str, Tensor] = {}
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)] + list(clean_names)
    positions = _masked_positions(batch.loss_mask)
    with model.hooks(fwd_hooks=[(n, _grab_into(store)) for n in names]):
        final = model(batch.tokens, stop_at_layer=n_layers)
    with model.hooks(fwd_hooks=[("unembed.hook_in", _select_positions(positions))]):
        logits = model(final, start_at_layer=n_layers)
    nll, correct = nll_and_correct(logits, batch, positions)
    resid_pre = [store[f"blocks.{layer}.hook_resid_pre"] for layer in range(n_layers)] + [final]
    return Chunk(batch, positions, resid_pre, {n: store[n] for n in clean_names}), nll, correct


def run_patched(model: HookedTransformer, chunk: Chunk, job: Job,
                new_value: Callable[[Tensor], Tensor], broadcast: bool) -> tuple[Tensor, Tensor]:
    """Run ``chunk`` from ``job``'s block with ``job.hook`` replaced by ``new_value(clean)``.

    ``broadcast``: a one-row replacement may stay one row (downstream broadcasts it); otherwise it
    is expanded to the activation's shape first. Returns (summed NLL, correct argmaxes).
    """
    head = job.head

    def patch(act: Tensor, hook) -> Tensor:
        new = new_value(act)
        if head is not None:
            out = act.clone()
            out[:, :, head] = new[:, :, head]
            return out
        if new.shape[0] != act.shape[0] and not broadcast:
            new = new.expand(act.shape).contiguous()
        return new

    hooks = [(job.hook, patch)] + [(n, _one_row) for n in job.one_row]
    hooks += [(n, _put_back(chunk.clean[n])) for n in job.clean]
    if not job.hook.startswith("unembed."):
        hooks.append(("unembed.hook_in", _select_positions(chunk.positions)))
    x = chunk.batch.tokens if job.start is None else chunk.resid_pre[job.start]
    if job.one_row_input:
        x = x[:1]
    with model.hooks(fwd_hooks=hooks):
        logits = model(x) if job.start is None else model(x, start_at_layer=job.start)
    if job.hook.startswith("unembed."):
        logits = logits[:, chunk.positions]
    return nll_and_correct(logits, chunk.batch, chunk.positions)


# --- memory ---------------------------------------------------------------------------------------
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


@contextlib.contextmanager
def keep_freed_memory() -> Iterator[None]:
    """While active, glibc keeps freed chunk-sized blocks for reuse instead of returning them.

    Every chunk allocates and frees the same tensors (tens of MB) again and again. glibc hands
    blocks above its mmap threshold, and heap tops above its trim threshold, back to the kernel,
    so each reuse page-faults them in afresh: on the 2-core VM this was measured at up to half the
    run time (millions of faults, seconds of system time per 1000 rows). Inside this context
    blocks up to 32 MiB come from the heap and the heap is not trimmed; on exit the trim threshold
    is set to 64 MiB (what glibc's own adaptive rule reaches once it has seen a 32 MiB block) and
    free memory is trimmed. The mmap threshold stays at 32 MiB, glibc's adaptive maximum. No-op
    where glibc's ``mallopt`` is not available.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    mallopt(_M_TRIM_THRESHOLD, 1 << 40)
    try:
        yield
    finally:
        mallopt(_M_TRIM_THRESHOLD, 64 << 20)
        malloc_trim(0)


def chunks(n: int, size: int) -> Iterator[slice]:
    for lo in range(0, n, size):
        yield slice(lo, min(lo + size, n))
