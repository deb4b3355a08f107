"""The block math the patching engine resumes with: TransformerLens's own forward, cut to what a
metric at one position can see.

A patched run is the corrupted run until the patched layer, and at positions before the first
position the patch changes (the model is causal), so ``FastBlocks`` continues from the corrupted
cache: a block runs on positions ``[p0, T)`` only, with the corrupted keys and values of positions
``< p0`` in front of its own, and the last block computes its query, attention output and MLP at
each row's answer position only. Everything else is TransformerLens's arithmetic: the LayerNorm and
MLP modules are the model's own (called directly, so every normalisation and activation variant
behaves as in ``model(tokens)``), and the attention repeats ``AbstractAttention.forward``
(``q @ k^T / attn_scale``, the causal mask with ``IGNORE``, softmax, ``pattern @ v``, ``F.linear``
with the flattened ``W_O``). Only rounding may differ (q, k and v come from one fused matmul).

``supported(model)`` says which architectures this covers; others go through the hook path.
"""

from __future__ import annotations

from functools import partial

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from toylens._compat import HookedTransformer


def supported(model: HookedTransformer) -> str | None:
    """None when ``FastBlocks`` reproduces this model's forward; else why not (the hook path is used)."""
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    c = model.cfg
    checks = {
        "positional embedding": c.positional_embedding_type not in ("standard", "rotary"),
        "grouped-query attention": c.n_key_value_heads is not None,
        "parallel attention/MLP": c.parallel_attn_mlp,
        "split q/k/v inputs": c.use_attn_in or c.use_split_qkv_input,
        "norm before and after": c.use_normalization_before_and_after,
        "post-norm": c.original_architecture in POST_NORM_ARCHITECTURES,
        "mixture of experts": c.num_experts is not None,
        "qk norm": c.use_qk_norm,
        "attention soft-cap": bool(c.attn_scores_soft_cap and c.attn_scores_soft_cap > 0),
        "local attention": c.use_local_attn,
        "non-causal attention": c.attention_dir != "causal",
        "attention sinks": c.use_attention_sinks,
        "clip_qkv": c.clip_qkv is not None,
        "logn attention": c.use_logn_attn,
        "dynamic ntk rope": c.use_dynamic_ntk_rope,
        "4-bit weights": c.load_in_4bit,
        f"dtype {c.dtype}": c.dtype not in (torch.float32, torch.float64),
    }
    bad = [name for name, flag in checks.items() if flag]
    return ", ".join(bad) if bad else None


class FastBlocks:
    """Per-layer weights of ``model`` laid out for resumed, position-restricted forwards."""

    def __init__(self, model: HookedTransformer):
        self.model = model
        cfg = model.cfg
        self.n_layers, self.n_heads, self.d_head = cfg.n_layers, cfg.n_heads, cfg.d_head
        self.attn_only = cfg.attn_only
        self.rotary = cfg.positional_embedding_type == "rotary"
        hd = self.n_heads * self.d_head
        self.w_qkv, self.b_qkv, self.w_o, self.b_o = [], [], [], []
        with torch.no_grad():
            for block in model.blocks:
                a = block.attn
                ws = [einops.rearrange(w, "h m d -> (h d) m") for w in (a.W_Q, a.W_K, a.W_V)]
                self.w_qkv.append(torch.cat(ws).contiguous())
                self.b_qkv.append(torch.cat([b.reshape(-1) for b in (a.b_Q, a.b_K, a.b_V)]).contiguous())
                self.w_o.append(einops.rearrange(a.W_O, "h d m -> m (h d)").contiguous())
                self.b_o.append(a.b_O.detach())
        # q alone and k, v together are row slices of the fused weight (views, no copies)
        self.w_q = [w[:hd] for w in self.w_qkv]
        self.b_q = [b[:hd] for b in self.b_qkv]
        self.w_kv = [w[hd:] for w in self.w_qkv]
        self.b_kv = [b[hd:] for b in self.b_qkv]
        self.ln1 = [_norm_fn(block.ln1) for block in model.blocks]
        self.ln2 = [None if self.attn_only else _norm_fn(block.ln2) for block in model.blocks]
        self.mlp = [None if self.attn_only else _mlp_fn(block.mlp) for block in model.blocks]

    # --- pieces ----------------------------------------------------------------------------------
    def rotate(self, layer: int, x: Float[Tensor, "n pos head_index d_head"],
               positions: Int[Tensor, "n pos"] | Int[Tensor, " pos"]) -> Tensor:
        """``AbstractAttention.apply_rotary`` at explicit (per-row or shared) positions."""
        if not self.rotary:
            return x
        attn = self.model.blocks[layer].attn
        rd = attn.cfg.rotary_dim
        cos, sin = attn.rotary_cos[positions], attn.rotary_sin[positions]  # [(n,) pos, rd]
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        if positions.ndim == 1:
            cos, sin = cos[None], sin[None]
        x_rot, x_pass = x[..., :rd], x[..., rd:]
        return torch.cat([x_rot * cos + attn.rotate_every_two(x_rot) * sin, x_pass], dim=-1)

    def attention(self, layer: int, q: Float[Tensor, "n qpos head_index d_head"],
                  k: Float[Tensor, "n kpos head_index d_head"], v: Float[Tensor, "n kpos head_index d_head"],
                  qpos: Int[Tensor, "n qpos"] | Int[Tensor, " qpos"], keep: dict | None = None,
                  ) -> Float[Tensor, "n qpos head_index d_head"]:
        """Causal attention of queries at absolute positions ``qpos`` over keys ``0..kpos-1``
        (the pattern is put in ``keep["pattern"]`` when ``keep`` is given)."""
        attn = self.model.blocks[layer].attn
        scores = q.transpose(1, 2) @ k.permute(0, 2, 3, 1) / attn.attn_scale  # [n, head, qpos, kpos]
        keys = torch.arange(k.shape[1], device=k.device)
        future = keys > (qpos[..., None] if qpos.ndim == 1 else qpos[:, None, :, None])
        scores = torch.where(future, attn.IGNORE, scores)
        pattern = F.softmax(scores, dim=-1)
        if keep is not None:
            keep["pattern"] = pattern
        return (pattern @ v.transpose(1, 2)).transpose(1, 2)

    def head_attention(self, layer: int, q: Float[Tensor, "n qpos d_head"], k: Float[Tensor, "n kpos d_head"],
                       v: Float[Tensor, "n kpos d_head"], qpos: Int[Tensor, "n qpos"]) -> Tensor:
        """One head's causal attention (the patched head of a q or k patch)."""
        attn = self.model.blocks[layer].attn
        scores = q @ k.transpose(1, 2) / attn.attn_scale  # [n, qpos, kpos]
        future = torch.arange(k.shape[1], device=k.device) > qpos[..., None]
        pattern = F.softmax(torch.where(future, attn.IGNORE, scores), dim=-1)
        return pattern @ v

    def attn_out(self, layer: int, z: Float[Tensor, "... head_index d_head"]) -> Float[Tensor, "... d_model"]:
        return F.linear(z.flatten(-2), self.w_o[layer], self.b_o[layer])

    def after_attention(self, layer: int, resid_mid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """resid_post from resid_mid (the MLP half; identity for attention-only models)."""
        if self.attn_only:
            return resid_mid
        out = self.mlp[layer](self.ln2[layer](resid_mid))
        return out.add_(resid_mid)

    def qkv(self, layer: int, x: Float[Tensor, "n pos d_model"], positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k (rotated at ``positions``) and v of residual ``x``: ``[n, pos, head_index, d_head]`` each."""
        qkv = F.linear(self.ln1[layer](x), self.w_qkv[layer], self.b_qkv[layer])
        q, k, v = qkv.unflatten(-1, (3, self.n_heads, self.d_head)).unbind(2)
        return self.rotate(layer, q, positions), self.rotate(layer, k, positions), v

    # --- whole blocks ----------------------------------------------------------------------------
    def block(self, layer: int, x: Float[Tensor, "n pos d_model"], k_prefix: Tensor, v_prefix: Tensor,
              p0: int) -> Float[Tensor, "n pos d_model"]:
        """Block ``layer`` on positions ``[p0, p0 + pos)``, keys/values of earlier positions given."""
        n, p = x.shape[:2]
        h = self.ln1[layer](x)
        qkv = F.linear(h, self.w_qkv[layer], self.b_qkv[layer]).unflatten(-1, (3, self.n_heads, self.d_head))
        q, k, v = qkv.unbind(2)
        positions = torch.arange(p0, p0 + p, device=x.device)
        q, k = self.rotate(layer, q, positions), self.rotate(layer, k, positions)
        k = torch.cat([k_prefix, k], dim=1) if p0 else k
        v = torch.cat([v_prefix, v], dim=1) if p0 else v
        z = self.attention(layer, q, k, v, positions)
        return self.after_attention(layer, x + self.attn_out(layer, z))

    def last_block(self, layer: int, x: Float[Tensor, "n pos d_model"], k_prefix: Tensor | None,
                   v_prefix: Tensor | None, p0: int, answer_pos: Int[Tensor, " n"]) -> Float[Tensor, "n d_model"]:
        """Block ``layer`` when only each row's ``answer_pos`` is read afterwards: the query, attention
        output and MLP at ``answer_pos`` alone, against keys and values of every position.

        Without rotary embeddings the keys and values of positions ``[p0, p0 + pos)`` are never
        formed: the one query is taken into the residual basis (``W_K q``), and the values' weighted
        sum is taken there too (``W_V^T sum_j pattern_j ln1(x_j)``), the same sums in another order,
        which costs ``d_model`` per position and head instead of a ``d_model x d_head`` projection."""
        n, p = x.shape[:2]
        attn = self.model.blocks[layer].attn
        h = self.ln1[layer](x)
        rows = torch.arange(n, device=x.device)
        at = answer_pos - p0
        q = F.linear(h[rows, at], self.w_q[layer], self.b_q[layer]).unflatten(-1, (self.n_heads, self.d_head))
        if self.rotary:
            positions = torch.arange(p0, p0 + p, device=x.device)
            kv = F.linear(h, self.w_kv[layer], self.b_kv[layer]).unflatten(-1, (2, self.n_heads, self.d_head))
            k, v = kv.unbind(2)
            k = self.rotate(layer, k, positions)
            k = torch.cat([k_prefix, k], dim=1) if p0 else k
            v = torch.cat([v_prefix, v], dim=1) if p0 else v
            q = self.rotate(layer, q[:, None], answer_pos[:, None])
            z = self.attention(layer, q, k, v, answer_pos[:, None])[:, 0]
            return self.after_attention(layer, x[rows, at] + self.attn_out(layer, z))
        q_resid = torch.einsum("nhe,hde->nhd", q, attn.W_K)  # [n, head_index, d_model]
        scores = torch.einsum("nhd,npd->nhp", q_resid, h) + (q * attn.b_K).sum(-1)[..., None]
        if p0:
            scores = torch.cat([torch.einsum("nhe,nphe->nhp", q, k_prefix), scores], dim=-1)
        scores = scores / attn.attn_scale  # [n, head_index, key_pos]
        future = torch.arange(p0 + p, device=x.device) > answer_pos[:, None, None]
        pattern = F.softmax(torch.where(future, attn.IGNORE, scores), dim=-1)
        new = pattern[..., p0:]  # [n, head_index, pos]
        z = torch.einsum("nhd,hde->nhe", torch.einsum("nhp,npd->nhd", new, h), attn.W_V)
        z = z + new.sum(-1)[..., None] * attn.b_V
        if p0:
            z = z + torch.einsum("nhp,nphe->nhe", pattern[..., :p0], v_prefix)
        return self.after_attention(layer, x[rows, at] + self.attn_out(layer, z))

    def run_with_cache(self, tokens: Int[Tensor, "batch pos"], acts: set[str]) -> dict[str, list[Tensor]]:
        """The model's forward pass on ``tokens`` keeping activations ``acts`` of every layer (names as
        ``patching_kinds`` uses them: resid_pre, q, rot_q, k, rot_k, v, pattern, z, attn_out, resid_mid,
        mlp_out, resid_post); no unembedding."""
        out: dict[str, list[Tensor]] = {a: [] for a in acts}
        x = self.model.input_to_embed(tokens)[0]
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        for layer in range(self.n_layers):
            qkv = F.linear(self.ln1[layer](x), self.w_qkv[layer], self.b_qkv[layer])
            q, k, v = qkv.unflatten(-1, (3, self.n_heads, self.d_head)).unbind(2)
            keep = {"resid_pre": x, "q": q, "k": k, "v": v}
            keep["rot_q"], keep["rot_k"] = q, k = self.rotate(layer, q, positions), self.rotate(layer, k, positions)
            keep["z"] = z = self.attention(layer, q, k, v, positions, keep if "pattern" in acts else None)
            keep["attn_out"] = attn_out = self.attn_out(layer, z)
            keep["resid_mid"] = mid = x + attn_out
            if self.attn_only:
                x = mid
            else:
                keep["mlp_out"] = mlp_out = self.mlp[layer](self.ln2[layer](mid))
                x = mid + mlp_out
            keep["resid_post"] = x
            for a in acts:
                out[a].append(keep[a].contiguous())
        return out



def _norm_fn(module: torch.nn.Module):
    """LayerNorm / LayerNormPre as one fused ``F.layer_norm`` (the same normalisation; rounding differs)."""
    from transformer_lens.components import LayerNorm, LayerNormPre

    if type(module) not in (LayerNorm, LayerNormPre) or module.cfg.dtype not in (torch.float32, torch.float64):
        return module
    if type(module) is LayerNorm:
        return lambda x: F.layer_norm(x, (x.shape[-1],), module.w, module.b, module.eps)
    if type(module) is LayerNormPre:
        return lambda x: F.layer_norm(x, (x.shape[-1],), None, None, module.eps)
    return module


# TransformerLens's activations as one fused kernel each: gelu_new, gelu_fast and gelu_pytorch_tanh are
# the tanh approximation of GELU (TL's gelu_new spends as long in its seven elementwise passes over
# [positions, d_mlp] as in the matmul before it); relu runs in place.
_FUSED_ACT = {"relu": torch.relu_, "gelu": F.gelu, "silu": F.silu,
              "gelu_new": partial(F.gelu, approximate="tanh"), "gelu_fast": partial(F.gelu, approximate="tanh"),
              "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}


def _mlp_fn(module: torch.nn.Module):
    """TransformerLens's ``MLP.forward`` (two ``addmm``) without its hook calls, the activation fused."""
    from transformer_lens.components.mlps.mlp import MLP

    if type(module) is not MLP or module.cfg.is_layer_norm_activation():
        return module
    act = _FUSED_ACT.get(module.cfg.act_fn, module.act_fn)

    def mlp(x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        post = act(torch.addmm(module.b_in, flat, module.W_in))
        return torch.addmm(module.b_out, post, module.W_out).view(*x.shape[:-1], -1)

    return mlp
