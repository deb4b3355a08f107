"""Small models of many architectures with random weights of non-trivial scale (LayerNorm gains 1 ± 0.3,
non-zero biases), built in-process: the matrix every engine and analysis is held to TransformerLens on."""

from __future__ import annotations

from typing import Any

import torch

from toylens._compat import HookedTransformer, HookedTransformerConfig
from toylens.model.build import make_model

_BASE: dict[str, Any] = dict(n_layers=3, d_model=48, n_heads=3, d_head=16, d_mlp=64, d_vocab=37, n_ctx=19,
                             act_fn="gelu", normalization_type="LN")

# name -> (HookedTransformerConfig overrides, toylens positional setting, fused engine expected to accept it)
MATRIX: dict[str, tuple[dict[str, Any], str, bool]] = {
    "ln-standard-gelu": ({}, "standard", True),
    "lnpre-relu": (dict(normalization_type="LNPre", act_fn="relu"), "standard", True),
    "rms-silu": (dict(normalization_type="RMS", act_fn="silu"), "standard", True),
    "rmspre-gelu_new": (dict(normalization_type="RMSPre", act_fn="gelu_new"), "standard", True),
    "nonorm-relu": (dict(normalization_type=None, act_fn="relu"), "standard", True),
    "pos-none": (dict(act_fn="relu"), "none", True),
    "rotary": (dict(positional_embedding_type="rotary", rotary_dim=8), "rotary", True),
    "attn-only": (dict(attn_only=True, d_mlp=None, act_fn=None), "standard", True),
    "dmodel-ne-heads": (dict(d_model=40, n_heads=4, d_head=7, act_fn="gelu_fast"), "standard", True),
    "gelu-pytorch-tanh": (dict(act_fn="gelu_pytorch_tanh"), "standard", True),
    "inverse-layer-scale": (dict(scale_attn_by_inverse_layer_idx=True), "standard", True),
    "bidirectional": (dict(attention_dir="bidirectional"), "standard", True),
    "no-attn-scale": (dict(use_attn_scale=False), "standard", True),
    "attn-result": (dict(use_attn_result=True), "standard", True),
    "alibi": (dict(positional_embedding_type="alibi"), "alibi", False),
    "solu-ln": (dict(act_fn="solu_ln"), "standard", False),
    "gated-mlp": (dict(gated_mlp=True, act_fn="silu"), "standard", False),
    "grouped-query": (dict(n_key_value_heads=1), "standard", False),
    "logit-softcap": (dict(output_logits_soft_cap=5.0), "standard", False),
    "parallel-attn-mlp": (dict(parallel_attn_mlp=True), "standard", False),
}


def random_model(name: str, seed: int = 0, **overrides: Any) -> HookedTransformer:
    """The model ``MATRIX[name]`` with seeded random weights of non-trivial scale, in eval mode."""
    extra, pos, _ = MATRIX[name]
    kwargs = {**_BASE, **extra, **overrides}
    if pos in ("rotary", "alibi"):
        kwargs["positional_embedding_type"] = pos
    cfg = HookedTransformerConfig(seed=seed, **kwargs)
    model = make_model(cfg, "none" if pos == "none" else "standard")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if not p.requires_grad:  # positional "none": W_pos stays zero
                continue
            leaf = pname.rsplit(".", 1)[-1]
            noise = torch.randn(p.shape, generator=gen)
            if leaf == "w":  # LayerNorm / RMSNorm gains
                p.copy_(1 + 0.3 * noise)
            elif leaf.startswith("b"):
                p.copy_(0.2 * noise)
            elif leaf in ("W_E", "W_pos"):
                p.copy_(noise)
            else:  # fan-in scaling keeps activations O(1) through the layers
                fan_in = p.shape[-2] if p.ndim >= 2 else 1
                p.copy_(1.2 * noise / fan_in ** 0.5)
    return model.eval()
