"""The fused engine against HookedTransformer over the config matrix (toylens.model.zoo): logits, logits at
chosen positions, gradients, and the two bugs that hand-written forwards once had; and the eligibility
function's classification of every HookedTransformerConfig field."""

import dataclasses

import pytest
import torch

from toylens._compat import HookedTransformerConfig
from toylens.model import eligibility
from toylens.model.fused import Engine, EngineError, forward
from toylens.model.zoo import MATRIX, random_model

ACCEPTED = [name for name, (_, _, ok) in MATRIX.items() if ok]


def _tokens(model, n=5, seed=0):
    return torch.randint(0, model.cfg.d_vocab, (n, model.cfg.n_ctx), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(MATRIX))
def test_eligibility_matches_the_matrix(name):
    model = random_model(name)
    why = eligibility.fast_path_reason(model)
    assert (why is None) == MATRIX[name][2], why
    if why is not None:
        assert "\n" not in why
        with pytest.raises(EngineError, match="fused engine does not compute"):
            Engine(model)


@pytest.mark.parametrize("name", ACCEPTED)
def test_engine_equals_hooked_transformer_float64(name):
    # float64: what remains is the math, not rounding (a no-norm model's logits reach a few hundred)
    model = random_model(name).to(torch.float64, print_details=False)
    tokens = _tokens(model)
    with torch.no_grad():
        ref = model(tokens)
        engine = Engine(model)
        torch.testing.assert_close(engine.forward(tokens), ref, atol=1e-9, rtol=1e-9)
        at = torch.tensor([0, 4, 11, model.cfg.n_ctx - 1])
        torch.testing.assert_close(engine.forward(tokens, at), ref[:, at], atol=1e-9, rtol=1e-9)
        shorter = tokens[:, :7]  # fewer positions than n_ctx
        torch.testing.assert_close(engine.forward(shorter), model(shorter), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", ACCEPTED)
def test_engine_float32_and_training_gradients(name):
    model = random_model(name)
    tokens = _tokens(model, seed=1)
    params = [p for p in model.parameters() if p.requires_grad]
    ref = model(tokens)
    out = forward(model, tokens)
    scale = ref.abs().max().item()
    assert (out - ref).abs().max().item() < 2e-5 * max(1.0, scale)
    g_ref = torch.autograd.grad(ref.log_softmax(-1)[..., 0].sum(), params)
    g_out = torch.autograd.grad(out.log_softmax(-1)[..., 0].sum(), params)
    g_scale = max(g.abs().max().item() for g in g_ref)
    for (pname, _), a, b in zip([(n, p) for n, p in model.named_parameters() if p.requires_grad], g_ref, g_out,
                                strict=True):
        assert (a - b).abs().max().item() < 1e-4 * g_scale, pname


def test_inverse_layer_scale_divides_each_layer_by_its_own_scale():
    # The bug: one attn_scale for every layer. TransformerLens divides layer l by attn_scale * (l + 1).
    model = random_model("inverse-layer-scale")
    engine = Engine(model)
    assert [layer.scale for layer in engine.layers] == pytest.approx([4.0, 8.0, 12.0])
    plain = random_model("ln-standard-gelu")
    tokens = _tokens(model)
    with torch.no_grad():
        assert (model(tokens) - plain(tokens)).abs().max() > 1e-2  # the flag changes the function
        torch.testing.assert_close(engine.forward(tokens), model(tokens), atol=2e-5, rtol=1e-5)


def test_bidirectional_attends_to_later_positions():
    model = random_model("bidirectional")
    tokens = _tokens(model)
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % model.cfg.d_vocab
    with torch.no_grad():
        engine = Engine(model)
        a, b = engine.forward(tokens), engine.forward(changed)
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-3  # position 0 sees the last token
    torch.testing.assert_close(a, model(tokens), atol=2e-5, rtol=1e-5)


def test_bf16_autocast_tracks_fp32():
    model = random_model("pos-none")
    tokens = _tokens(model)
    ref = model(tokens).log_softmax(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = forward(model, tokens)
    assert out.dtype == torch.bfloat16
    assert (out.float().log_softmax(-1) - ref).abs().max().item() < 0.15  # bf16: ~3 significant digits


def test_every_config_field_is_classified():
    # A new TransformerLens field fails here until it is sorted into NEUTRAL or CHECKS.
    fields = {f.name for f in dataclasses.fields(HookedTransformerConfig)}
    known = eligibility.NEUTRAL | set(eligibility.CHECKS)
    assert fields - known == set()
    assert not eligibility.NEUTRAL & set(eligibility.CHECKS)


def test_an_unknown_field_routes_to_transformer_lens(monkeypatch):
    model = random_model("ln-standard-gelu")
    monkeypatch.setattr(eligibility, "NEUTRAL", eligibility.NEUTRAL - {"rotary_base"})
    assert "rotary_base" in eligibility.fast_path_reason(model)


def test_positional_none_with_nonzero_w_pos_is_refused():
    model = random_model("pos-none")
    assert eligibility.fast_path_reason(model) is None
    with torch.no_grad():
        model.W_pos[3, 0] = 1.0
    assert "W_pos" in eligibility.fast_path_reason(model)
