"""Model construction: positional "none", model_config.json round trip, the fused training forward."""

from __future__ import annotations

import json

import pytest
import torch

from toylens._compat import HookedTransformerConfig
from toylens.model import fused as fast_forward
from toylens.model.build import (
    build_model,
    fold_layer_norm,
    make_model,
    model_config_dict,
    model_from_config_dict,
    positional_embedding_type,
)
from toylens.runs.config import ModelConfig
from toylens.train.optim import make_optimizer


def _none_model(**kw):
    mc = ModelConfig(n_layers=2, d_model=32, n_heads=2, d_head=16, d_mlp=64, positional_embedding_type="none", **kw)
    return build_model(mc, d_vocab=20, n_ctx=12, seed=0)


def test_positional_none_is_zero_frozen_and_not_optimised(tiny):
    model = _none_model()
    assert positional_embedding_type(model) == "none"
    assert torch.count_nonzero(model.W_pos) == 0 and not model.W_pos.requires_grad
    opt, _ = make_optimizer(model, tiny().optim, total_steps=10)
    optimised = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.pos_embed.W_pos) not in optimised
    # and weight decay cannot touch it either: a few steps with huge decay leave it exactly zero
    for _ in range(3):
        model(torch.randint(0, 20, (4, 12))).sum().backward()
        opt.step()
        opt.zero_grad()
    assert torch.count_nonzero(model.W_pos) == 0


def test_positional_none_survives_json_reload_and_folding():
    model = _none_model()
    d = json.loads(json.dumps(model_config_dict(model)))
    again = model_from_config_dict(d)
    again.load_state_dict(model.state_dict())
    assert positional_embedding_type(again) == "none" and not again.W_pos.requires_grad
    folded = fold_layer_norm(again)
    assert positional_embedding_type(folded) == "none" and torch.count_nonzero(folded.W_pos) == 0
    tokens = torch.randint(0, 20, (3, 12))
    torch.testing.assert_close(again(tokens), model(tokens))


def test_model_from_config_dict_leaves_global_rng_alone():
    d = model_config_dict(_none_model())
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    model_from_config_dict(d)
    fold_layer_norm(_none_model())  # constructs internally, too
    # _none_model itself seeds (it initialises weights); the loader and folding must not
    torch.manual_seed(123)
    m = model_from_config_dict(d)
    fold_layer_norm(m)
    assert torch.equal(torch.rand(3), expected)


def test_model_config_dict_rejects_unknown_fields():
    d = model_config_dict(_none_model())
    d["n_laers"] = 3
    with pytest.raises(ValueError, match="n_laers"):
        model_from_config_dict(d)


FAST_CASES = [
    dict(normalization_type="LN", act_fn="relu", pos="none"),
    dict(normalization_type="LN", act_fn="gelu", pos="standard"),
    dict(normalization_type="LNPre", act_fn="gelu_new", pos="standard"),
    dict(normalization_type=None, act_fn="silu", pos="none"),
    dict(normalization_type="LN", attn_only=True, pos="standard"),
]


@pytest.mark.parametrize("case", FAST_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_fast_forward_equals_hooked_transformer(case):
    case = dict(case)
    pos = case.pop("pos")
    attn_only = case.pop("attn_only", False)
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=None if attn_only else 64,
                                  d_vocab=23, n_ctx=10, attn_only=attn_only, seed=1,
                                  act_fn=case.pop("act_fn", None), **case)
    model = make_model(cfg, pos)
    with torch.no_grad():  # biases are zero at init: give them values so they are tested too
        for name, p in model.named_parameters():
            if name.split(".")[-1].startswith("b_") or name.endswith(".b"):
                p.normal_(0, 0.1)
    assert fast_forward.supports(model) is None
    tokens = torch.randint(0, 23, (5, 10))
    ref = model(tokens)
    out = fast_forward.forward(model, tokens)
    assert (out - ref).abs().max().item() < 1e-5
    # and gradients agree, parameter by parameter
    g_ref = torch.autograd.grad(ref.logsumexp(-1).sum(), [p for p in model.parameters() if p.requires_grad])
    g_out = torch.autograd.grad(out.logsumexp(-1).sum(), [p for p in model.parameters() if p.requires_grad])
    for a, b in zip(g_ref, g_out, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_fast_forward_declines_what_it_does_not_compute():
    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=11, n_ctx=8,
                                  act_fn="relu", positional_embedding_type="rotary", rotary_dim=8)
    assert "rotary" in fast_forward.supports(make_model(cfg))


def test_fast_forward_under_bf16_autocast_tracks_fp32():
    model = _none_model()
    tokens = torch.randint(0, 20, (8, 12))
    ref = model(tokens).log_softmax(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast_forward.forward(model, tokens)
    assert out.dtype == torch.bfloat16
    assert (out.float().log_softmax(-1) - ref).abs().max().item() < 0.1  # bf16 has ~3 significant digits


def test_transformer_lens_deprecation_warning_is_silenced_inside_toylens_only():
    import warnings

    from toylens._compat import HookedTransformer

    cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_heads=1, d_head=8, d_mlp=16, d_vocab=5, n_ctx=4,
                                  act_fn="relu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = make_model(cfg)
        fold_layer_norm(model)
        model_from_config_dict(model_config_dict(model))
    assert not [w for w in caught if "deprecated" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:  # the user's own construction still warns
        warnings.simplefilter("always")
        HookedTransformer(cfg)
    assert any("deprecated" in str(w.message) for w in caught)
