"""Model construction: positional "none", model_config.json round trip, the fused training forward."""

from __future__ import annotations

import json

import pytest
import torch

from toylens._compat import HookedTransformerConfig
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


# The fused forward's equality with HookedTransformer (logits, gradients, bf16) is tests/model/test_engine.py.


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
