"""The plan behind ``ablate_every_hook``, shared by its two runners: per label, where the run resumes and
which values are dead; loss and accuracy per chunk; worker threads. Why each trick is exact:
docs/analyses.md, "The ablation plan"."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

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
# Mean and resample ablation commute with the linear maps between these hook points (z @ W_O + b_O,
# post @ W_out + b_out, (normalized * w + b) @ W_in + b_in): replacing the key by its mean (or by
# another row's value) gives exactly what replacing the value does, up to float rounding. Computed once.
_SAME_UNDER_LINEAR_MODES = {  # suffixes within a block
    "attn.hook_z": "hook_attn_out",
    "attn.hook_result": "hook_attn_out",
    "mlp.hook_post": "hook_mlp_out",
    "ln2.hook_normalized": "mlp.hook_pre",
}
_SAME_UNDER_LINEAR_MODES_OUTSIDE = {  # (the soft-cap comes after unembed.hook_out)
    "unembed.hook_out": "unembed.hook_in",
    "unembed.hook_in": "ln_final.hook_normalized",
}
LINEAR_MODES = ("mean", "resample")  # zero is not: zero z gives attn_out = b_O, not 0
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
    same_as: str | None = None  # in LINEAR_MODES, the label of a job with the same result


# --- which hooks, and how to run each ------------------------------------------------------------
def one_row_tricks_ok(model: HookedTransformer, engine_why: str | None) -> bool:
    """The one-row tricks hold for the models the fused engine computes (plain sequential pre-norm blocks),
    when each norm hook point is one tensor per block (no split q/k/v inputs, no hook_mlp_in)."""
    c = model.cfg
    return engine_why is None and not (c.use_split_qkv_input or c.use_attn_in or c.use_hook_mlp_in)


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
    if not fast:
        return jobs
    # the same result under LINEAR_MODES: follow the chain to a job that is computed
    wanted = set(labels)

    def alias(label: str) -> str | None:
        if HEAD_LABEL.fullmatch(label):
            return None
        if label.startswith("blocks."):
            _, layer, suffix = label.split(".", 2)
            target = _SAME_UNDER_LINEAR_MODES.get(suffix)
            target = target and f"blocks.{layer}.{target}"
        else:
            target = _SAME_UNDER_LINEAR_MODES_OUTSIDE.get(label)
        return target if target in wanted else None

    out = []
    for job in jobs:
        target, nxt = None, alias(job.label)
        while nxt is not None:
            target, nxt = nxt, alias(nxt)
        out.append(dataclasses.replace(job, same_as=target))
    return out


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


# --- loss and accuracy ---------------------------------------------------------------------------
def masked_positions(mask: Tensor) -> slice | Tensor:
    """Positions where some row is loss-masked: a slice when they are contiguous."""
    cols = mask.any(0).nonzero().flatten()
    if len(cols) == 0:
        return slice(0, 0)
    lo, hi = int(cols[0]), int(cols[-1]) + 1
    return slice(lo, hi) if hi - lo == len(cols) else cols


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


def evaluate_jobs(jobs: Sequence[Job], modes: Sequence[str], batch: Batch, nll: Tensor, correct: Tensor,
                  run_one: Callable[[Job, str], tuple[Tensor, Tensor]]) -> Tensor:
    """Every (job, mode) on one chunk: ``[1 + jobs * modes, 3]`` rows of (NLL sum, correct, n); row 0
    is the clean run (``nll``, ``correct``). A job with ``same_as`` reuses that job's result in LINEAR_MODES."""
    done: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}
    for job in jobs:
        for mode in modes:
            if job.same_as is None or mode not in LINEAR_MODES:
                done[job.label, mode] = run_one(job, mode)
    out = [(nll, correct)]
    out += [done[j.label if j.same_as is None or m not in LINEAR_MODES else j.same_as, m] for j in jobs for m in modes]
    n = batch.loss_mask.sum().double()
    return torch.stack([torch.stack([a.double(), b.double(), n]) for a, b in out])


# --- driving: worker threads ---------------------------------------------------------------------
def map_chunks(fn: Callable[[slice], object], n_rows: int, chunk_rows: int, workers: int,
               desc: str, progress: bool) -> list:
    """``[fn(rows) for rows in chunks]``, in order, on ``workers`` threads under inference mode."""
    items = [slice(lo, min(lo + chunk_rows, n_rows)) for lo in range(0, n_rows, chunk_rows)]
    bar = tqdm(total=len(items), desc=desc, disable=not progress)

    def one(rows: slice):
        with torch.inference_mode():  # per thread: grad mode is thread-local
            out = fn(rows)
        bar.update(1)
        return out

    try:
        if workers <= 1 or len(items) <= 1:
            return [one(rows) for rows in items]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ablation") as pool:
            return list(pool.map(one, items))
    finally:
        bar.close()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Set torch's intra-op threads for the duration (restored after)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
