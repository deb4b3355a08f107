"""The engine behind ``toylens.analyze.patching``: every (patch, prompt) item of a sweep, planned, chunked and
stacked along the batch. Why each shortcut is exact: docs/analyses.md, "The patching engine"."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor
from tqdm.auto import tqdm

from toylens.analyze.ablation.plan import torch_threads
from toylens.analyze.patching.chunks import run_chunk_fast, run_chunk_hooks
from toylens.analyze.patching.context import Context
from toylens.analyze.patching.kinds import _TOKEN_LOCAL, KINDS, Kind, PatchingError, hook_name, n_heads_for

__all__ = ["KINDS", "Context", "Kind", "PatchingError", "enumerate_patches", "hook_name", "make_chunks",
           "n_heads_for", "plan_items", "run_sweep"]


# --- the patches and items of a sweep ------------------------------------------------------------
@dataclasses.dataclass
class Patches:
    """The patches of one kind in TransformerLens's order (C order of ``shape``)."""

    kind: Kind
    shape: tuple[int, ...]
    layer: Tensor
    pos: Tensor  # position (dest_pos for patterns); -1 for all-position kinds
    head: Tensor  # -1 for layer × pos kinds
    src: Tensor  # src_pos of pattern_dest_src, else -1


def enumerate_patches(ctx: Context, kind: Kind) -> Patches:
    model = ctx.model
    sizes = {"layer": model.cfg.n_layers, "pos": ctx.n_pos, "dest_pos": ctx.n_pos, "src_pos": ctx.n_pos,
             "head_index": n_heads_for(model, kind.act)}
    shape = tuple(sizes[a] for a in kind.axes)
    grids = torch.meshgrid(*(torch.arange(s, device=ctx.pairs.clean.device) for s in shape), indexing="ij")
    idx = torch.stack(grids, -1).reshape(-1, len(shape))  # C order, as itertools.product in TL
    col = {a: idx[:, i] for i, a in enumerate(kind.axes)}
    none = torch.full_like(idx[:, 0], -1)
    pos = col.get("pos", col.get("dest_pos", none))
    return Patches(kind, shape, col["layer"], pos, col.get("head_index", none), col.get("src_pos", none))


def plan_items(ctx: Context, patches: Patches) -> tuple[Tensor, Tensor, Tensor]:
    """The (patch, row) pairs whose metric can differ from the corrupted run's, and where each starts.

    Returns (patch index, row, p0): ``p0`` is the first position whose activations the item changes.
    """
    kind, L = patches.kind, ctx.model.cfg.n_layers
    a, f = ctx.pairs.answer_pos[None], ctx.first_diff[None]  # [1, batch]
    if not ctx.causal:  # every position sees every other: a prompt with any change starts at 0
        a, f = torch.full_like(a, ctx.n_pos - 1), torch.where(f < ctx.n_pos, 0, ctx.n_pos)
    layer = patches.layer[:, None]
    answer = ctx.pairs.answer_pos[None]
    if kind.all_pos:
        active = (f <= a).expand(len(patches.layer), -1)
        p0 = f.expand_as(active)
    else:
        p = patches.pos[:, None]
        active = (p >= f) & (p <= a)
        if kind.local:  # in the last layer a local patch only reaches its own position
            active &= (layer < L - 1) | (p == answer)
        if kind.act in _TOKEN_LOCAL:
            active &= (layer > 0) | ctx.tokdiff[:, patches.pos].T
        if kind.name == "pattern_dest_src" and ctx.causal:
            active &= patches.src[:, None] <= p
        p0 = (p if ctx.causal else torch.zeros_like(p)).expand_as(active)
    item_patch, item_row = active.nonzero(as_tuple=True)
    p0 = p0[item_patch, item_row]
    order = torch.argsort(patches.layer[item_patch] * (ctx.n_pos + 1) + p0, stable=True)
    return item_patch[order], item_row[order], p0[order]


def item_bytes(ctx: Context, n_pos: int) -> int:
    """Rough peak bytes one item needs in a chunk running ``n_pos`` positions."""
    c = ctx.model.cfg
    d_mlp = 0 if c.attn_only else (c.d_mlp or 0)
    hd = c.n_heads * c.d_head
    per_pos = 6 * c.d_model + 2 * d_mlp + 4 * hd + 2 * c.n_heads * ctx.T
    return 4 * (n_pos * per_pos + 3 * ctx.T * hd) + 64


def make_chunks(ctx: Context, layers: Tensor, p0: Tensor, budget_bytes: int,
                min_rows: int = 64) -> list[tuple[int, int, int]]:
    """Consecutive item ranges ``(start, stop, p0)`` of one layer each that fit ``budget_bytes``.

    Items come sorted by (layer, p0). The items of the next (layer, p0) group join the current
    chunk, which runs from its first (smallest) p0, while the chunk fits the budget and either is
    still small (under ``min_rows * T`` item-positions: per-chunk overhead dominates) or the group
    needs at least three quarters of the chunk's positions (bounding the recomputed, unchanged ones).
    """
    chunks: list[tuple[int, int, int]] = []
    if len(p0) == 0:
        return chunks
    key = layers * (ctx.n_pos + 1) + p0
    _, counts = torch.unique_consecutive(key, return_counts=True)
    start = 0
    cur: list[int] | None = None  # [start, stop, layer, p0]
    for n in counts.tolist():
        layer, q0 = int(layers[start]), int(p0[start])
        stop = start + n
        if cur is not None and cur[2] == layer:
            width = ctx.T - cur[3]
            cap = max(1, budget_bytes // item_bytes(ctx, width))
            small = (cur[1] - cur[0]) * width < min_rows * ctx.T
            if cur[1] - cur[0] + n <= cap and (small or (ctx.T - q0) * 4 >= width * 3):
                cur[1] = stop
                start = stop
                continue
        if cur is not None:
            chunks.extend(_split(ctx, cur, budget_bytes))
        cur = [start, stop, layer, q0]
        start = stop
    chunks.extend(_split(ctx, cur, budget_bytes))
    return chunks


def _split(ctx: Context, cur: list[int], budget_bytes: int) -> list[tuple[int, int, int]]:
    s, e, _, q0 = cur
    cap = max(1, budget_bytes // item_bytes(ctx, ctx.T - q0))
    return [(i, min(i + cap, e), q0) for i in range(s, e, cap)]


# --- running a chunk -----------------------------------------------------------------------------
def run_sweep(ctx: Context, kind: Kind, budget_bytes: int, progress: bool = True, workers: int = 1,
              only: Tensor | None = None) -> Tensor:
    """Raw metric (mean over prompts) of every patch of ``kind``, shaped as TransformerLens returns it.

    ``workers > 1`` (CPU, fast path): chunks run in that many threads, torch single-threaded in each
    (no OpenMP barrier in every small op, which collapses when other processes share the cores).
    ``only``: flat indices of the patches to run (like TransformerLens's ``index_df``); NaN elsewhere.
    """
    ctx.prepare([kind])
    patches = enumerate_patches(ctx, kind)
    item_patch, item_row, p0 = plan_items(ctx, patches)
    if only is not None:
        keep = torch.isin(item_patch, only.to(item_patch.device))
        item_patch, item_row, p0 = item_patch[keep], item_row[keep], p0[keep]
    delta = torch.zeros(len(patches.layer), dtype=torch.float64, device=p0.device)
    chunks = make_chunks(ctx, patches.layer[item_patch], p0, budget_bytes)
    run: Callable = run_chunk_fast if ctx.fast else run_chunk_hooks

    def one(chunk: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
        s, e, q0 = chunk
        pi, rows = item_patch[s:e], item_row[s:e]
        sel = {k: getattr(patches, k)[pi] for k in ("pos", "head", "src")}
        with torch.inference_mode():  # per thread: grad mode is thread-local
            resid = run(ctx, kind, int(patches.layer[pi[0]]), q0, rows, **sel)
            return pi, ctx.metric_rows(resid, rows) - ctx.corr_rows[rows]

    threaded = workers > 1 and ctx.fast and len(chunks) > 1 and p0.device.type == "cpu"
    with tqdm(total=len(chunks), desc=f"patching {kind.name}", disable=not progress) as bar:
        with torch_threads(1) if threaded else contextlib.nullcontext():
            pool = ThreadPoolExecutor(workers, thread_name_prefix="patching") if threaded else None
            try:
                for pi, d in (pool.map(one, chunks) if pool else map(one, chunks)):
                    delta.index_add_(0, pi, d)
                    bar.update(1)
            finally:
                if pool:
                    pool.shutdown()
    mean = (ctx.corr_rows.sum() + delta) / ctx.b
    if only is not None:
        mean[~torch.isin(torch.arange(len(mean), device=mean.device), only.to(mean.device))] = float("nan")
    return mean.float().reshape(patches.shape)
