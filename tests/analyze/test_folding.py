import json

import pytest
import torch

import toylens.model.fold as fold_mod
from toylens._compat import HookedTransformerConfig
from toylens.data.base import Batch
from toylens.model.build import make_model, positional_embedding_type
from toylens.model.fold import FoldCheckError, FoldResult, fold


def tiny_model(norm="LN", pos="standard", seed=0, attn_only=False):
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_heads=2, d_head=16, d_vocab=40, n_ctx=12, normalization_type=norm,
        attn_only=attn_only, seed=seed, **({} if attn_only else dict(d_mlp=64, act_fn="gelu")))
    model = make_model(cfg, positional_embedding_type=pos)
    # Non-trivial LN weights and biases, so folding has something to move.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("ln" in name or ".b_" in name or name.endswith("b_U")):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def tokens(n=16, seed=1):
    return torch.randint(0, 40, (n, 12), generator=torch.Generator().manual_seed(seed))


def reference_diff(a, b, toks, dtype=torch.float32):
    """The plain comparison, on copies of both models converted to ``dtype``."""
    import copy

    a, b = copy.deepcopy(a).to(dtype, print_details=False), copy.deepcopy(b).to(dtype, print_details=False)
    with torch.no_grad():
        return (a(toks).log_softmax(-1) - b(toks).log_softmax(-1)).abs().max().item()


@pytest.mark.parametrize("norm", ["LN", "RMS"])
@pytest.mark.parametrize("pos", ["standard", "none"])
def test_fold_is_equivalent(norm, pos):
    model = tiny_model(norm, pos)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    toks = tokens()
    res = fold(model, Batch(toks, toks, torch.ones_like(toks, dtype=torch.bool)), tol=1e-4)
    assert isinstance(res, FoldResult) and res.passed
    assert res.model is not model
    assert res.model.cfg.normalization_type == norm + "Pre"
    assert res.folded_normalization_type == norm + "Pre"
    # the check reports what an independent comparison measures, and it is small
    ref64 = reference_diff(model, res.model, toks, torch.float64)
    assert res.max_abs_logprob_diff == pytest.approx(ref64, abs=1e-9)
    assert res.max_abs_logprob_diff_fp32 == pytest.approx(reference_diff(model, res.model, toks), abs=1e-7)
    assert res.max_abs_logprob_diff < 1e-5  # in float64 only the folded weights' float32 rounding remains
    assert res.n_tokens_checked == toks.numel()
    # the original model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    if pos == "none":
        assert torch.count_nonzero(res.model.W_pos) == 0
        assert not res.model.W_pos.requires_grad
        assert positional_embedding_type(res.model) == "none"
        assert res.w_pos_norm_before == 0.0 and res.w_pos_norm_after == 0.0
    else:
        assert res.w_pos_norm_before > 0 and res.w_pos_norm_after > 0


def test_fold_accepts_tokens_and_chunks():
    model, toks = tiny_model(seed=3), tokens(10, seed=4)
    whole = fold(model, toks, chunk_size=1000)
    chunked = fold(model, toks, chunk_size=3)
    assert chunked.max_abs_logprob_diff == pytest.approx(whole.max_abs_logprob_diff, abs=1e-7)


@pytest.mark.parametrize("norm", [None, "LNPre"])
def test_nothing_to_fold_returns_model_unchanged(norm):
    model = tiny_model(norm)
    res = fold(model, tokens(4))
    assert res.model is model
    assert res.max_abs_logprob_diff == 0.0 and res.passed
    assert "nothing to fold" in res.note


def test_fold_fails_loudly(monkeypatch):
    real = fold_mod.fold_layer_norm

    def broken(model):
        folded = real(model)
        with torch.no_grad():
            folded.blocks[0].attn.W_V.add_(0.5 * torch.randn_like(folded.blocks[0].attn.W_V))
        return folded

    monkeypatch.setattr(fold_mod, "fold_layer_norm", broken)
    with pytest.raises(FoldCheckError, match=r"max \|delta log-prob\| \(float64\) = [0-9.e+-]+ > tol"):
        fold(tiny_model(), tokens(4))


def test_fold_leaves_the_global_rng_alone():
    # HookedTransformerConfig(seed=...) reseeds torch globally; folding builds one.
    model, toks = tiny_model(), tokens(4)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fold(model, toks)
    assert torch.equal(torch.rand(3), expected)


def test_to_dict_is_json_and_leaves_out_the_model():
    res = fold(tiny_model(), tokens(4))
    d = res.to_dict()
    json.dumps(d)
    assert "model" not in d
    assert d["passed"] is True and d["tol"] == 1e-4
    assert res.figures() == {}
