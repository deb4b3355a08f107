"""Which models the fused engine computes exactly: ``fast_path_reason(model)`` is None, or one line naming
the setting. Every ``HookedTransformerConfig`` field is classified below; a field not listed (a new
TransformerLens release) routes the model to TransformerLens's own forward, never to the fast path."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from toylens._compat import HookedTransformer
from toylens.model.build import positional_embedding_type

# Fields that never change the function a forward pass computes from given weights (names, sizes the
# weights already carry, initialisation, tokenizer and bookkeeping).
NEUTRAL = frozenset({
    "d_model", "d_head", "n_layers", "n_ctx", "n_heads", "d_mlp", "d_vocab", "d_vocab_out", "device", "seed",
    "default_prepend_bos", "model_name", "original_architecture", "from_checkpoint", "checkpoint_index",
    "checkpoint_label_type", "checkpoint_value", "tokenizer_name", "init_mode", "initializer_range",
    "init_weights", "n_params", "tokenizer_prepends_bos", "trust_remote_code", "decoder_start_token_id",
    "tie_word_embeddings", "layer_norm_folding", "train_seq_length", "attn_scale", "eps", "rotary_dim",
    "rotary_base", "rotary_base_local", "rotary_scaling_factor", "rotary_adjacent_pairs",
    # NTK-by-parts and YaRN only change how the rotary tables are filled; the engine reads the tables.
    "use_NTK_by_parts_rope", "NTK_by_parts_low_freq_factor", "NTK_by_parts_high_freq_factor", "NTK_by_parts_factor",
    "NTK_original_ctx_len", "use_yarn_rope", "yarn_factor", "yarn_attention_factor", "yarn_beta_fast",
    "yarn_beta_slow", "yarn_original_max_position_embeddings", "yarn_truncate", "yarn_global_attn_only",
    # Only add hook points (hook_result, split q/k/v inputs, hook_mlp_in, hook_tokens): the same math.
    # Analyses that replace activations check the hook points a model fires on their own.
    "use_attn_result", "use_split_qkv_input", "use_attn_in", "use_hook_mlp_in", "use_hook_tokens",
    "ungroup_grouped_query_attention", "experts_per_token", "norm_topk_prob", "relative_attention_max_distance",
    "relative_attention_num_buckets", "quantization_method", "window_size",
})

_FUSED_ACTS = ("relu", "gelu", "silu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh")
_NORMS = (None, "LN", "LNPre", "RMS", "RMSPre")


def _pos(c: Any, model: HookedTransformer | None) -> str | None:
    p = c.positional_embedding_type
    return None if p in ("standard", "rotary") else f"positional_embedding_type={p!r}"


def _flag(flag: str) -> Callable[[Any, Any], str | None]:
    return lambda c, m: f"{flag}=True" if getattr(c, flag) else None


# Fields that change the math: each maps to a check returning None (the engine computes it) or the reason.
CHECKS: dict[str, Callable[[Any, Any], str | None]] = {
    "positional_embedding_type": _pos,
    "normalization_type": lambda c, m: None if c.normalization_type in _NORMS
    else f"normalization_type={c.normalization_type!r}",
    "uses_rms_norm": lambda c, m: None,  # implied by normalization_type, which is checked
    "final_rms": lambda c, m: "final_rms=True" if c.final_rms else None,
    "attn_only": lambda c, m: None,
    "act_fn": lambda c, m: None if c.attn_only or c.act_fn in _FUSED_ACTS else f"act_fn={c.act_fn!r}",
    "gated_mlp": lambda c, m: "gated_mlp=True" if c.gated_mlp and not c.attn_only else None,
    "n_key_value_heads": lambda c, m: None if c.n_key_value_heads in (None, c.n_heads)
    else f"n_key_value_heads={c.n_key_value_heads} (grouped-query attention)",
    "num_experts": lambda c, m: f"num_experts={c.num_experts}" if c.num_experts else None,
    "dtype": lambda c, m: None if c.dtype in (torch.float32, torch.float64) else f"dtype={c.dtype}",
    "use_attn_scale": lambda c, m: None,  # the engine reads each layer's own attn_scale
    "scale_attn_by_inverse_layer_idx": lambda c, m: None,  # likewise
    "attention_dir": lambda c, m: None if c.attention_dir in ("causal", "bidirectional")
    else f"attention_dir={c.attention_dir!r}",
    "use_qk_norm": _flag("use_qk_norm"),
    "clip_qkv": lambda c, m: f"clip_qkv={c.clip_qkv}" if c.clip_qkv is not None else None,
    "use_logn_attn": _flag("use_logn_attn"),
    "use_dynamic_ntk_rope": _flag("use_dynamic_ntk_rope"),
    "use_local_attn": _flag("use_local_attn"),
    "attn_types": lambda c, m: None if not c.attn_types or set(c.attn_types) == {"global"}
    else f"attn_types={c.attn_types} (local attention)",
    "n_devices": lambda c, m: f"n_devices={c.n_devices}" if c.n_devices != 1 else None,
    "parallel_attn_mlp": _flag("parallel_attn_mlp"),
    "post_embedding_ln": _flag("post_embedding_ln"),
    "load_in_4bit": _flag("load_in_4bit"),
    "use_normalization_before_and_after": _flag("use_normalization_before_and_after"),
    "attn_scores_soft_cap": lambda c, m: f"attn_scores_soft_cap={c.attn_scores_soft_cap}"
    if c.attn_scores_soft_cap > 0 else None,
    "output_logits_soft_cap": lambda c, m: f"output_logits_soft_cap={c.output_logits_soft_cap}"
    if c.output_logits_soft_cap > 0 else None,
    "use_attention_sinks": _flag("use_attention_sinks"),
}


def _architecture(c: Any) -> str | None:
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    if c.original_architecture in POST_NORM_ARCHITECTURES:
        return f"original_architecture={c.original_architecture!r} (post-norm blocks)"
    return None


def fast_path_reason(model: HookedTransformer) -> str | None:
    """None when the fused engine computes exactly ``model``'s forward; else the first setting it does not."""
    c = model.cfg
    for f in dataclasses.fields(c):
        if f.name in NEUTRAL:
            continue
        check = CHECKS.get(f.name)
        if check is None:
            return f"{f.name} (a HookedTransformerConfig field toylens's fused engine does not know)"
        why = check(c, model)
        if why:
            return why
    why = _architecture(c)
    if why:
        return why
    if c.positional_embedding_type == "rotary" and c.rotary_dim is not None and c.rotary_dim % 2:
        return f"rotary_dim={c.rotary_dim} (odd)"
    if positional_embedding_type(model) == "none" and bool(model.W_pos.detach().ne(0).any()):
        return "positional embedding 'none' with a non-zero W_pos (the engine adds no positions)"
    return None
