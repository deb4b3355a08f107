"""A fused training forward pass over a HookedTransformer's own parameters.

HookedTransformer's eager forward routes every activation through hook points and einsums
(~175 ms per seed training step on 2 CPU cores). For training we compute the same function with
fused kernels (``scaled_dot_product_attention``, ``layer_norm``, one QKV matmul) on the very same
``nn.Parameter`` objects, so gradients land in the HookedTransformer and everything downstream
(checkpoints, analysis, hooks) sees an ordinary HookedTransformer. Equality with ``model(tokens)``
is a test, not an assumption; configurations this path does not cover fall back to the model's
own forward (``supports`` says why).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from toylens._compat import HookedTransformer
from toylens.model.build import positional_embedding_type

_ACTS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def supports(model: HookedTransformer) -> str | None:
    """None when the fused path computes exactly this model's function, else the reason it cannot."""
    c = model.cfg
    checks = [
        (c.positional_embedding_type == "standard", f"positional_embedding_type={c.positional_embedding_type}"),
        (c.normalization_type in (None, "LN", "LNPre"), f"normalization_type={c.normalization_type}"),
        (c.attn_only or c.act_fn in _ACTS, f"act_fn={c.act_fn}"),
        (not getattr(c, "gated_mlp", False), "gated_mlp"),
        (not getattr(c, "parallel_attn_mlp", False), "parallel_attn_mlp"),
        (getattr(c, "n_key_value_heads", None) in (None, c.n_heads), "grouped-query attention"),
        (getattr(c, "attn_types", None) is None, "local attention"),
        (getattr(c, "use_attn_scale", True), "use_attn_scale=False"),
        (getattr(c, "attn_scores_soft_cap", -1.0) <= 0, "attn_scores_soft_cap"),
        (getattr(c, "output_logits_soft_cap", -1.0) <= 0, "output_logits_soft_cap"),
        (not getattr(c, "use_normalization_before_and_after", False), "use_normalization_before_and_after"),
        (not getattr(c, "final_rms", False), "final_rms"),
        (getattr(c, "n_devices", 1) == 1, "n_devices>1"),
    ]
    for ok, why in checks:
        if not ok:
            return why
    return None


def _norm(x: torch.Tensor, ln, kind: str | None, eps: float) -> torch.Tensor:
    if kind == "LN":
        return F.layer_norm(x, x.shape[-1:], ln.w, ln.b, eps)
    if kind == "LNPre":
        return F.layer_norm(x, x.shape[-1:], None, None, eps)
    return x


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention. fp32: PyTorch's fused kernel. bf16 (autocast): an explicit masked softmax in
    fp32 between bf16 matmuls; on CPU the fused bf16 kernel's backward is ~4x slower than this."""
    if q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    p = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)).float() * scale
    causal = torch.ones(p, p, dtype=torch.bool, device=q.device).tril()
    pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    return pattern.to(v.dtype) @ v


def forward(model: HookedTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """Logits ``[batch, pos, d_vocab_out]``, equal to ``model(tokens)`` up to float rounding."""
    c = model.cfg
    b, p = tokens.shape
    n, dh = c.n_heads, c.d_head
    x = F.embedding(tokens, model.embed.W_E)
    if positional_embedding_type(model) != "none":  # under "none" W_pos is zero and frozen
        x = x + model.pos_embed.W_pos[:p]
    scale = 1.0 / c.attn_scale
    for blk in model.blocks:
        a = blk.attn
        h = _norm(x, getattr(blk, "ln1", None), c.normalization_type, c.eps)
        # One matmul for Q, K and V: [d_model, 3 * n_heads * d_head].
        w_qkv = torch.cat([a.W_Q, a.W_K, a.W_V], 0).permute(1, 0, 2).reshape(c.d_model, 3 * n * dh)
        b_qkv = torch.cat([a.b_Q, a.b_K, a.b_V], 0).reshape(3 * n * dh)
        qkv = torch.addmm(b_qkv, h.reshape(b * p, c.d_model), w_qkv).view(b, p, 3, n, dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [batch, head, pos, d_head]
        z = _attention(q, k, v, scale)
        z = z.transpose(1, 2).reshape(b * p, n * dh)
        x = x + torch.addmm(a.b_O, z, a.W_O.reshape(n * dh, c.d_model)).view(b, p, c.d_model)
        if not c.attn_only:
            m = blk.mlp
            h = _norm(x, getattr(blk, "ln2", None), c.normalization_type, c.eps).reshape(b * p, c.d_model)
            pre = torch.addmm(m.b_in, h, m.W_in)
            x = x + torch.addmm(m.b_out, _ACTS[c.act_fn](pre), m.W_out).view(b, p, c.d_model)
    x = _norm(x, getattr(model, "ln_final", None), c.normalization_type, c.eps)
    return torch.addmm(model.unembed.b_U, x.reshape(b * p, c.d_model), model.unembed.W_U).view(b, p, -1)
