"""Running one chunk of stacked patches (see ``patching_engine``): through ``FastBlocks`` (resumed at
the patched layer and first changed position, the last block at the answer position only), or
through TransformerLens's own blocks with a patching hook for architectures ``FastBlocks`` does not
cover. Each returns the final residual at every item's answer position."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from toylens.analyze.patching.kinds import Kind, hook_name

if TYPE_CHECKING:
    from toylens.analyze.patching.context import Context

_LP = ("layer", "pos")


def run_chunk_fast(ctx: Context, kind: Kind, layer: int, p0: int, rows: Tensor, pos: Tensor, head: Tensor,
                   src: Tensor) -> Float[Tensor, "n d_model"]:
    """Final residual at the answer position of each item (patch ``kind`` at ``layer``), via ``FastBlocks``."""
    C, L, T = ctx.corr, ctx.model.cfg.n_layers, ctx.T
    a = ctx.pairs.answer_pos[rows]
    ar = torch.arange(len(rows), device=rows.device)
    if kind.act == "resid_pre":
        return resid_pre_patch(ctx, layer, rows, pos, p0, a)
    # positions of ``layer`` whose output the patch changes (and later layers or the metric read)
    if kind.local:
        qpos: Tensor | slice = pos[:, None]
    elif layer == L - 1:
        qpos = a[:, None]
    else:
        qpos = slice(p0, T)
    rp = patched_layer(ctx, kind, layer, rows, qpos, pos, head, src)  # [n, Q, d_model]
    if layer == L - 1:
        return rp[:, 0]  # local kinds run only where pos == answer_pos
    if kind.local:
        x = C["resid_post"][layer][rows, p0:T]
        x[ar, pos - p0] = rp[:, 0]
    else:
        x = rp
    return resume(ctx, layer + 1, x, rows, p0, a)


def resid_pre_patch(ctx: Context, layer: int, rows: Tensor, pos: Tensor, p0: int, a: Tensor) -> Tensor:
    """A resid_pre patch at ``pos``: in its layer only that position's query, key and value change,
    so those are computed there and the other positions' come from the corrupted cache."""
    fb, C, K, L, T = ctx.blocks, ctx.corr, ctx.clean, ctx.model.cfg.n_layers, ctx.T
    ar = torch.arange(len(rows), device=rows.device)
    kname, qname = ("rot_k", "rot_q") if "rot_k" in C else ("k", "q")
    x_p = K["resid_pre"][layer][rows, pos]  # [n, d_model]
    q_p, k_p, v_p = fb.qkv(layer, x_p[:, None], pos[:, None])  # [n, 1, head_index, d_head] each
    keys, values = C[kname][layer][rows], C["v"][layer][rows]  # [n, T, head_index, d_head]
    keys[ar, pos], values[ar, pos] = k_p[:, 0], v_p[:, 0]
    if layer == L - 1:  # only the answer position is read: its query, attention and MLP
        q = C[qname][layer][rows, a]
        here = pos == a
        q[here] = q_p[here, 0]
        resid = C["resid_pre"][layer][rows, a]
        resid[here] = x_p[here]
        z = fb.attention(layer, q[:, None], keys, values, a[:, None])[:, 0]
        return fb.after_attention(layer, resid + fb.attn_out(layer, z))
    x = C["resid_pre"][layer][rows, p0:T]
    x[ar, pos - p0] = x_p
    q = C[qname][layer][rows, p0:T]
    q[ar, pos - p0] = q_p[:, 0]
    z = fb.attention(layer, q, keys, values, torch.arange(p0, T, device=rows.device))
    return resume(ctx, layer + 1, fb.after_attention(layer, x + fb.attn_out(layer, z)), rows, p0, a)


def resume(ctx: Context, start: int, x: Tensor, rows: Tensor, p0: int, a: Tensor) -> Tensor:
    """Blocks ``start..`` on positions ``[p0, T)`` of ``x``; the final residual at the answer positions."""
    fb, C, L = ctx.blocks, ctx.corr, ctx.model.cfg.n_layers
    kname = "rot_k" if "rot_k" in C else "k"
    for j in range(start, L):
        kp = C[kname][j][rows, :p0] if p0 else None
        vp = C["v"][j][rows, :p0] if p0 else None
        if j < L - 1:
            x = fb.block(j, x, kp, vp, p0)
        else:
            return fb.last_block(j, x, kp, vp, p0, a)
    raise AssertionError("resume past the last layer")


def _at(t: Tensor, rows: Tensor, qpos: Tensor | slice, head: Tensor | None = None) -> Tensor:
    """``t[row, qpos(, head)]`` per item: ``[n, Q, ...]`` (a copy); ``qpos`` a shared slice or ``[n, Q]``."""
    if isinstance(qpos, slice):
        return t[rows, qpos] if head is None else t[rows, qpos, head]
    return t[rows[:, None], qpos] if head is None else t[rows[:, None], qpos, head[:, None]]


def _pattern_rows(t: Tensor, rows: Tensor, head: Tensor, qpos: Tensor | slice) -> Tensor:
    """``pattern[row, head, qpos, :]`` per item: ``[n, Q, key_pos]``."""
    if isinstance(qpos, slice):
        return t[rows, head, qpos]
    return t[rows[:, None], head[:, None], qpos]


def patched_layer(ctx: Context, kind: Kind, layer: int, rows: Tensor, qpos: Tensor | slice, pos: Tensor,
                  head: Tensor, src: Tensor) -> Float[Tensor, "n qpos d_model"]:
    """resid_post of ``layer`` at positions ``qpos`` with the patch applied."""
    fb, C, K = ctx.blocks, ctx.corr, ctx.clean
    act = kind.act
    if act == "resid_post":
        return _at(K["resid_post"][layer], rows, qpos)
    if act == "mlp_out":
        return _at(C["resid_mid"][layer], rows, qpos) + _at(K["mlp_out"][layer], rows, qpos)
    if act == "resid_mid":
        return fb.after_attention(layer, _at(K["resid_mid"][layer], rows, qpos))
    if act == "attn_out":
        return fb.after_attention(layer, _at(C["resid_pre"][layer], rows, qpos) + _at(K["attn_out"][layer], rows, qpos))
    z = _at(C["z"][layer], rows, qpos)  # [n, Q, head_index, d_head]
    z[torch.arange(len(rows), device=rows.device), :, head] = head_z(ctx, kind, layer, rows, qpos, pos, head, src)
    return fb.after_attention(layer, _at(C["resid_pre"][layer], rows, qpos) + fb.attn_out(layer, z))


def head_z(ctx: Context, kind: Kind, layer: int, rows: Tensor, qpos: Tensor | slice, pos: Tensor, head: Tensor,
           src: Tensor) -> Float[Tensor, "n qpos d_head"]:
    """The patched head's z at positions ``qpos``."""
    fb, C, K = ctx.blocks, ctx.corr, ctx.clean
    ar = torch.arange(len(rows), device=rows.device)
    kname, qname = ("rot_k", "rot_q") if "rot_k" in C else ("k", "q")
    act, by_pos = kind.act, not kind.all_pos
    if act == "z":
        return _at(K["z"][layer], rows, qpos, head)
    positions = torch.arange(qpos.start, qpos.stop, device=rows.device) if isinstance(qpos, slice) else qpos
    v = C["v"][layer][rows, :, head]  # [n, T, d_head]
    if act == "q":
        q = _at(K[qname][layer], rows, qpos, head)
        return fb.head_attention(layer, q, C[kname][layer][rows, :, head], v, positions)
    if act == "k":
        if by_pos:
            k = C[kname][layer][rows, :, head]
            k[ar, pos] = K[kname][layer][rows, pos, head]
        else:
            k = K[kname][layer][rows, :, head]
        return fb.head_attention(layer, _at(C[qname][layer], rows, qpos, head), k, v, positions)
    if act == "v":
        pattern = _pattern_rows(C["pattern"][layer], rows, head, qpos)  # [n, Q, key_pos]
        if by_pos:  # one value row changes: z moves by its attention weight times the change (linear)
            change = K["v"][layer][rows, pos, head] - v[ar, pos]  # [n, d_head]
            z = _at(C["z"][layer], rows, qpos, head)
            return z + pattern[ar, :, pos][..., None] * change[:, None]
        return pattern @ K["v"][layer][rows, :, head]
    if kind.name == "pattern_dest_src":
        pattern = C["pattern"][layer][rows, head, pos]  # [n, key_pos]
        pattern[ar, src] = K["pattern"][layer][rows, head, pos, src]
        return pattern[:, None] @ v
    return _pattern_rows(K["pattern"][layer], rows, head, qpos) @ v


def run_chunk_hooks(ctx: Context, kind: Kind, layer: int, p0: int, rows: Tensor, pos: Tensor, head: Tensor,
                    src: Tensor) -> Float[Tensor, "n d_model"]:
    """The same items through TransformerLens's blocks from ``layer``, the patch written by a hook."""
    model, L = ctx.model, ctx.model.cfg.n_layers
    clean = ctx.clean[kind.act][layer]
    ar = torch.arange(len(rows), device=rows.device)

    def patch(act: Tensor, hook) -> Tensor:
        act = act.clone()
        if kind.axes == _LP:
            act[ar, pos] = clean[rows, pos]
        elif kind.act != "pattern":
            if kind.all_pos:
                act[ar, :, head] = clean[rows, :, head]
            else:
                act[ar, pos, head] = clean[rows, pos, head]
        elif kind.name == "pattern_dest_src":
            act[ar, head, pos, src] = clean[rows, head, pos, src]
        elif kind.all_pos:
            act[ar, head] = clean[rows, head]
        else:
            act[ar, head, pos] = clean[rows, head, pos]
        return act

    x = ctx.corr["resid_pre"][layer][rows]
    with model.hooks(fwd_hooks=[(hook_name(kind.act, layer), patch)]):
        resid = model(x, start_at_layer=layer, stop_at_layer=L)
    return resid[ar, ctx.pairs.answer_pos[rows]]
