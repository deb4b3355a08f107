"""The one transformer engine: TransformerLens's forward written once, on a model's own weights.

Training, ablation, patching, tracing, task vectors and DLA call its pieces (``norm``, ``qkv``,
``attention``, ``mlp``, ``unembed``); ``eligibility.fast_path_reason`` says which models it computes
exactly, and tests hold it to ``HookedTransformer`` (logits, every hook, gradients) over a config matrix.
"""

from __future__ import annotations

import contextlib
import dataclasses
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from toylens._compat import HookedTransformer
from toylens.model.build import positional_embedding_type
from toylens.model.eligibility import fast_path_reason
from toylens.model.unembed import Unembed, ln_params, norm_fn

ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "gelu_new": partial(F.gelu, approximate="tanh"),
        "gelu_fast": partial(F.gelu, approximate="tanh"), "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}


class EngineError(ValueError):
    """A model the fused engine does not compute; the message names the setting."""


@dataclasses.dataclass
class Layer:
    """One block's weights in ``F.linear``'s ``[out, in]`` layout."""

    attn: torch.nn.Module  # the block's own attention: its attn_scale and rotary tables
    scale: float  # attn.attn_scale (sqrt(d_head), times layer + 1 under scale_attn_by_inverse_layer_idx)
    ln1: tuple
    w_qkv: Tensor  # [3 * n_heads * d_head, d_model]
    b_qkv: Tensor
    w_o: Tensor  # [d_model, n_heads * d_head]
    b_o: Tensor
    ln2: tuple = (None, None)
    w_in: Tensor | None = None  # [d_mlp, d_model]
    b_in: Tensor | None = None
    w_out: Tensor | None = None  # [d_model, d_mlp]
    b_out: Tensor | None = None

    def rows(self, part: str) -> tuple[Tensor, Tensor]:
        """Weight rows of ``q``, ``k``, ``v`` or ``kv`` within the fused QKV matmul (views)."""
        hd = self.w_qkv.shape[0] // 3
        lo, hi = {"q": (0, hd), "k": (hd, 2 * hd), "v": (2 * hd, 3 * hd), "kv": (hd, 3 * hd)}[part]
        return self.w_qkv[lo:hi], self.b_qkv[lo:hi]


class Engine:
    """TransformerLens's math on ``model``'s weights. ``detach=True``: laid out once (analysis; rebuild after
    the weights change); ``detach=False``: views and copies that gradients flow through (one per step)."""

    def __init__(self, model: HookedTransformer, detach: bool = True):
        why = fast_path_reason(model)
        if why:
            raise EngineError(f"the fused engine does not compute this model ({why}); use the model's own forward")
        c = model.cfg
        self.model, self.detach = model, detach
        self.n_layers, self.n_heads, self.d_head, self.d_model = c.n_layers, c.n_heads, c.d_head, c.d_model
        self.attn_only, self.eps, self.norm_type = c.attn_only, c.eps, c.normalization_type
        self.causal = c.attention_dir == "causal"
        self.rotary = c.positional_embedding_type == "rotary"
        self.rotary_dim = c.rotary_dim
        self.act = None if c.attn_only else ACTS[c.act_fn]
        # relu in place when nothing needs ``pre`` afterwards (saves a pass over [rows, pos, d_mlp])
        self.act_ = torch.relu_ if detach and c.act_fn == "relu" else self.act
        grad = torch.no_grad() if detach else contextlib.nullcontext()
        lay = (lambda t: t.detach().contiguous()) if detach else (lambda t: t)
        keep = (lambda t: None if t is None else t.detach()) if detach else (lambda t: t)
        with grad:
            self.W_E = keep(model.embed.W_E)
            self.W_pos = keep(model.pos_embed.W_pos) if positional_embedding_type(model) == "standard" else None
            self.layers = []
            hd = self.n_heads * self.d_head
            for blk in model.blocks:
                a = blk.attn
                w_qkv = torch.cat([a.W_Q, a.W_K, a.W_V], 0).transpose(1, 2).reshape(3 * hd, self.d_model)
                ln1 = tuple(map(keep, ln_params(blk.ln1, self.norm_type)))
                layer = Layer(attn=a, scale=float(a.attn_scale), ln1=ln1,
                              w_qkv=w_qkv.contiguous(),
                              b_qkv=torch.cat([a.b_Q, a.b_K, a.b_V], 0).reshape(3 * hd).contiguous(),
                              w_o=lay(a.W_O.reshape(hd, self.d_model).T), b_o=keep(a.b_O))
                if not self.attn_only:
                    m = blk.mlp
                    layer.ln2 = tuple(map(keep, ln_params(blk.ln2, self.norm_type)))
                    layer.w_in, layer.w_out = lay(m.W_in.T), lay(m.W_out.T)
                    layer.b_in, layer.b_out = keep(m.b_in), keep(m.b_out)
                self.layers.append(layer)
            self.ln_final = tuple(map(keep, ln_params(getattr(model, "ln_final", None), self.norm_type)))
        self.unembed = Unembed(model, detach=detach)
        self._loss_unembed: Unembed | None = None

    # --- pieces ----------------------------------------------------------------------------------
    def embed(self, tokens: Tensor) -> Tensor:
        """Token plus positional embedding (none for rotary and toylens's positional "none")."""
        x = F.embedding(tokens, self.W_E)
        return x if self.W_pos is None else x + self.W_pos[: tokens.shape[-1]]

    def norm(self, x: Tensor, ln: tuple) -> Tensor:
        return norm_fn(self.norm_type, ln[0], ln[1], self.eps)(x)

    def norm_parts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """What a norm's hooks see: (x centred for LayerNorm, as is for RMS; ``hook_scale``);
        ``hook_normalized`` is their quotient. Only for models with a norm."""
        if self.norm_type in ("LN", "LNPre"):
            x = x - x.mean(-1, keepdim=True)
        return x, (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()

    @staticmethod
    def norm_affine(normalized: Tensor, ln: tuple) -> Tensor:
        w, b = ln
        if w is None:
            return normalized
        return normalized * w if b is None else normalized * w + b

    def project(self, layer: int, h: Tensor, part: str = "qkv") -> Tensor:
        """``h @ W_{part} + b_{part}`` for part q, k, v, kv or qkv, unflattened to ``[..., n, head_index, d_head]``."""
        L = self.layers[layer]
        w, b = (L.w_qkv, L.b_qkv) if part == "qkv" else L.rows(part)
        out = F.linear(h, w, b)
        return out.unflatten(-1, (len(part), self.n_heads, self.d_head)) if len(part) > 1 else \
            out.unflatten(-1, (self.n_heads, self.d_head))

    def project_heads(self, layer: int, h: Tensor, part: str, head: int | None = None) -> Tensor:
        """Each head's own ``q``, ``k`` or ``v`` from its own normalised input ``h`` ``[..., head_index, d_model]``
        (split inputs, as TransformerLens's ``use_split_qkv_input``): ``[..., head_index, d_head]``; with ``head``,
        that head's alone from ``h`` ``[..., d_model]``: ``[..., d_head]``."""
        w, b = self.layers[layer].rows(part)
        w, b = w.reshape(self.n_heads, self.d_head, self.d_model), b.view(self.n_heads, self.d_head)
        if head is not None:
            return F.linear(h, w[head], b[head])
        return torch.einsum("...hm,hem->...he", h, w) + b

    def head_outputs(self, layer: int, z: Tensor, head: int | None = None) -> Tensor:
        """Each head's write to the residual stream, ``z @ W_O`` without ``b_O``: ``[head_index, ..., d_model]``
        from ``z`` ``[..., head_index, d_head]`` (TransformerLens's ``hook_result``); with ``head``, that head's
        from its ``z`` ``[..., d_head]``: ``[..., d_model]``."""
        w = self.layers[layer].w_o.reshape(self.d_model, self.n_heads, self.d_head)
        if head is not None:
            return F.linear(z, w[:, head])
        return torch.einsum("...he,mhe->h...m", z, w)

    def rotate(self, layer: int, x: Tensor, positions: Tensor | None = None) -> Tensor:
        """``apply_rotary`` of x ``[..., pos, head_index, d_head]`` at absolute ``positions`` (``[pos]`` shared, or
        ``[n, pos]``; default ``0..pos-1``), with the layer's own rotary tables; identity without rotary."""
        if not self.rotary:
            return x
        attn = self.layers[layer].attn
        if positions is None:
            positions = torch.arange(x.shape[-3], device=x.device)
        cos, sin = attn.rotary_cos[positions].unsqueeze(-2), attn.rotary_sin[positions].unsqueeze(-2)
        rd = self.rotary_dim
        x_rot = x[..., :rd]
        return torch.cat([x_rot * cos + attn.rotate_every_two(x_rot) * sin, x[..., rd:]], dim=-1)

    def qkv(self, layer: int, h: Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """q, k (rotated at ``positions``) and v of normalised input ``h``: ``[..., pos, head_index, d_head]``."""
        q, k, v = self.project(layer, h).unbind(-3)
        return self.rotate(layer, q, positions), self.rotate(layer, k, positions), v

    def future(self, qpos: Tensor | None, n_q: int, n_k: int, device) -> Tensor | None:
        """True where a key lies after its query (masked under causal attention); None when nothing is."""
        if not self.causal:
            return None
        qp = torch.arange(n_q, device=device) if qpos is None else qpos
        keys = torch.arange(n_k, device=device)
        return keys > qp[..., None] if qp.ndim == 1 else (keys > qp[..., None])[:, None]

    def scores(self, layer: int, q: Tensor, k: Tensor, qpos: Tensor | None = None) -> Tensor:
        """``hook_attn_scores``: ``q.k / attn_scale``, -inf at masked keys. q ``[n, Q, head, d_head]``, k
        ``[n, K, head, d_head]`` -> ``[n, head, Q, K]``; ``qpos``: the queries' absolute positions
        (``[Q]`` or ``[n, Q]``; default ``0..Q-1``); keys are positions ``0..K-1``."""
        s = q.transpose(-3, -2) @ k.permute(*range(k.ndim - 3), -2, -1, -3) / self.layers[layer].scale
        mask = self.future(qpos, q.shape[-3], k.shape[-3], q.device)
        return s if mask is None else s.masked_fill(mask, -torch.inf)

    @staticmethod
    def pattern(scores: Tensor) -> Tensor:
        """``hook_pattern``: softmax over keys, NaN (a row with every key masked) set to 0 as TransformerLens does."""
        p = scores.softmax(-1)
        return torch.where(torch.isnan(p), 0.0, p)

    @staticmethod
    def mix(pattern: Tensor, v: Tensor) -> Tensor:
        """``hook_z`` from a pattern ``[n, head, Q, K]`` and values ``[n, K, head, d_head]``."""
        return (pattern @ v.transpose(-3, -2)).transpose(-3, -2)

    def attention(self, layer: int, q: Tensor, k: Tensor, v: Tensor, qpos: Tensor | None = None,
                  keep: dict | None = None) -> Tensor:
        """``hook_z`` ``[n, Q, head, d_head]`` of queries at ``qpos`` over keys/values ``0..K-1``; the pattern
        goes into ``keep["pattern"]`` when ``keep`` is given."""
        if keep is None and q.dtype in (torch.float32, torch.float64) and q.ndim == 4:
            mask = self.future(qpos, q.shape[1], k.shape[1], q.device) if qpos is not None else None
            plain = qpos is None and q.shape[1] == k.shape[1]
            z = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=1.0 / self.layers[layer].scale,
                is_causal=plain and self.causal, attn_mask=None if mask is None else ~mask)
            return z.transpose(1, 2)
        if q.dtype not in (torch.float32, torch.float64):  # bf16 autocast: softmax in fp32 between bf16 matmuls
            pattern = self.pattern(self.scores(layer, q, k, qpos).float()).to(v.dtype)
        else:
            pattern = self.pattern(self.scores(layer, q, k, qpos))
        if keep is not None:
            keep["pattern"] = pattern
        return self.mix(pattern, v)

    def attn_out(self, layer: int, z: Tensor) -> Tensor:
        L = self.layers[layer]
        return F.linear(z.flatten(-2), L.w_o, L.b_o)

    def mlp_pre(self, layer: int, h: Tensor) -> Tensor:
        L = self.layers[layer]
        return F.linear(h, L.w_in, L.b_in)

    def mlp_out(self, layer: int, post: Tensor) -> Tensor:
        L = self.layers[layer]
        return F.linear(post, L.w_out, L.b_out)

    def mlp(self, layer: int, h: Tensor) -> Tensor:
        """``hook_mlp_out`` of normalised input ``h`` (``ln2``'s output)."""
        return self.mlp_out(layer, self.act_(self.mlp_pre(layer, h)))

    def after_attention(self, layer: int, resid_mid: Tensor) -> Tensor:
        """``hook_resid_post`` from ``hook_resid_mid`` (the identity for attention-only models)."""
        if self.attn_only:
            return resid_mid
        return resid_mid + self.mlp(layer, self.norm(resid_mid, self.layers[layer].ln2))

    # --- whole blocks and the model ---------------------------------------------------------------
    def block(self, layer: int, x: Tensor, prefix: tuple[Tensor, Tensor] | None = None, p0: int = 0) -> Tensor:
        """Block ``layer`` on positions ``[p0, p0 + pos)`` of ``x`` ``[n, pos, d_model]``; ``prefix``: the keys
        (rotated) and values of positions ``< p0`` (resuming a causal run from a cache)."""
        L = self.layers[layer]
        positions = torch.arange(p0, p0 + x.shape[1], device=x.device) if p0 else None
        q, k, v = self.qkv(layer, self.norm(x, L.ln1), positions)
        if prefix is not None and p0:
            k, v = torch.cat([prefix[0], k], 1), torch.cat([prefix[1], v], 1)
        z = self.attention(layer, q, k, v, positions)
        return self.after_attention(layer, x + self.attn_out(layer, z))

    def block_at(self, layer: int, x: Tensor, positions: Tensor) -> Tensor:
        """Block ``layer``'s output at ``positions`` only (``[P]``, shared by every row): queries, attention
        output and MLP there, keys and values wherever they can be seen from there."""
        L = self.layers[layer]
        h = self.norm(x, L.ln1)
        n_keys = int(positions.max()) + 1 if self.causal else x.shape[1]
        k, v = self.project(layer, h[:, :n_keys], "kv").unbind(-3)
        k = self.rotate(layer, k)
        q = self.rotate(layer, self.project(layer, h[:, positions], "q"), positions)
        z = self.attention(layer, q, k, v, positions)
        return self.after_attention(layer, x[:, positions] + self.attn_out(layer, z))

    def block_at_rows(self, layer: int, x: Tensor, prefix: tuple[Tensor, Tensor] | None, p0: int,
                      at: Tensor) -> Tensor:
        """Block ``layer``'s output at one position per row, ``at`` ``[n]`` (absolute), for ``x`` holding
        positions ``[p0, p0 + pos)`` and ``prefix`` the keys/values of positions ``< p0``.

        Without rotary embeddings the keys and values of the new positions are never formed: the query is
        taken into the residual basis (``W_K q``) and the values' weighted sum is taken there too
        (``W_V^T sum_j pattern_j ln1(x_j)``), the same sums in another order, which costs ``d_model`` per
        position and head instead of a ``d_model x d_head`` projection."""
        n, p = x.shape[:2]
        L = self.layers[layer]
        h = self.norm(x, L.ln1)
        rows = torch.arange(n, device=x.device)
        here = at - p0
        q = self.project(layer, h[rows, here], "q")  # [n, head_index, d_head]
        if self.rotary:
            k, v = self.project(layer, h, "kv").unbind(-3)
            k = self.rotate(layer, k, torch.arange(p0, p0 + p, device=x.device))
            if prefix is not None and p0:
                k, v = torch.cat([prefix[0], k], 1), torch.cat([prefix[1], v], 1)
            q = self.rotate(layer, q[:, None], at[:, None])
            z = self.attention(layer, q, k, v, at[:, None])[:, 0]
            return self.after_attention(layer, x[rows, here] + self.attn_out(layer, z))
        a = L.attn
        q_resid = torch.einsum("nhe,hde->nhd", q, a.W_K)  # [n, head_index, d_model]
        scores = torch.einsum("nhd,npd->nhp", q_resid, h) + (q * a.b_K).sum(-1)[..., None]
        if prefix is not None and p0:
            scores = torch.cat([torch.einsum("nhe,nphe->nhp", q, prefix[0]), scores], dim=-1)
        scores = scores / L.scale  # [n, head_index, key_pos]
        if self.causal:
            future = torch.arange(p0 + p, device=x.device) > at[:, None, None]
            scores = scores.masked_fill(future, -torch.inf)
        pattern = self.pattern(scores)
        new = pattern[..., p0:]  # [n, head_index, pos]
        z = torch.einsum("nhd,hde->nhe", torch.einsum("nhp,npd->nhd", new, h), a.W_V)
        z = z + new.sum(-1)[..., None] * a.b_V
        if prefix is not None and p0:
            z = z + torch.einsum("nhp,nphe->nhe", pattern[..., :p0], prefix[1])
        return self.after_attention(layer, x[rows, here] + self.attn_out(layer, z))

    def cache(self, tokens: Tensor, acts: set[str]) -> dict[str, list[Tensor]]:
        """The forward pass on ``tokens`` keeping activations ``acts`` of every layer (resid_pre, q, rot_q, k,
        rot_k, v, pattern, z, attn_out, resid_mid, mlp_out, resid_post: the hook names without ``hook_``);
        no unembedding."""
        out: dict[str, list[Tensor]] = {a: [] for a in acts}
        x = self.embed(tokens)
        for layer in range(self.n_layers):
            L = self.layers[layer]
            q, k, v = self.project(layer, self.norm(x, L.ln1)).unbind(-3)
            keep = {"resid_pre": x, "q": q, "k": k, "v": v}
            keep["rot_q"], keep["rot_k"] = q, k = self.rotate(layer, q), self.rotate(layer, k)
            keep["z"] = z = self.attention(layer, q, k, v, None, keep if "pattern" in acts else None)
            keep["attn_out"] = attn_out = self.attn_out(layer, z)
            keep["resid_mid"] = mid = x + attn_out
            if self.attn_only:
                x = mid
            else:
                keep["mlp_out"] = mlp_out = self.mlp(layer, self.norm(mid, L.ln2))
                x = mid + mlp_out
            keep["resid_post"] = x
            for a in acts:
                out[a].append(keep[a].contiguous())
        return out

    def forward(self, tokens: Tensor, positions: Tensor | None = None) -> Tensor:
        """Logits ``[batch, pos, d_vocab_out]`` equal to ``model(tokens)``; with ``positions`` (``[P]``) only
        those positions' ``[batch, P, d_vocab_out]``, the last block computed there alone."""
        x = self.embed(tokens)
        last = self.n_layers - (positions is not None)
        for layer in range(last):
            x = self.block(layer, x)
        if positions is not None:
            x = self.block_at(last, x, positions)
        return self.unembed(x)

    def loss_unembed(self) -> Unembed:
        """The unembedding padded for loss computations (see ``Unembed``'s ``for_loss``)."""
        if self._loss_unembed is None:
            self._loss_unembed = Unembed(self.model, for_loss=True, detach=self.detach)
        return self._loss_unembed


def forward(model: HookedTransformer, tokens: Tensor, positions: Tensor | None = None) -> Tensor:
    """``model(tokens)`` on the fused engine, gradients flowing into the model's parameters (training)."""
    return Engine(model, detach=False).forward(tokens, positions)
