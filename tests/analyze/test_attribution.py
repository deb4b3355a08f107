import json

import pytest
import torch
import torch.nn.functional as F

from toylens._compat import HookedTransformerConfig
from toylens.analyze.attribution import direct_logit_attribution, dla_per_token, logit_lens
from toylens.data.base import Batch
from toylens.model.build import make_model
from toylens.model.fold import fold

VOCAB, N_CTX = 30, 10


def tiny_model(norm="LN", pos="standard", attn_only=False, seed=0):
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=24, n_heads=2, d_head=8, d_vocab=VOCAB, n_ctx=N_CTX, normalization_type=norm,
        attn_only=attn_only, seed=seed, **({} if attn_only else dict(d_mlp=48, act_fn="gelu")))
    model = make_model(cfg, positional_embedding_type=pos)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # norm weights, b_U and MLP biases away from their trivial init values
        for name, p in model.named_parameters():
            if p.requires_grad and ("ln" in name or name.endswith(("b_U", "b_in", "b_out", "b_O"))):
                p.add_(0.5 * torch.randn(p.shape, generator=gen))
    return model


def make_batch(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (n, N_CTX), generator=gen)
    targets = torch.randint(0, VOCAB, (n, N_CTX), generator=gen)
    mask = torch.rand(n, N_CTX, generator=gen) < 0.6
    mask[:, 0] = False  # position 0 is never scored (as in "predict the previous token")
    return Batch(tokens, targets, mask)


@pytest.mark.parametrize("norm", ["LN", "RMS", "LNPre", None])
@pytest.mark.parametrize("relative", [False, True])
def test_components_sum_to_target_logit(norm, relative):
    """With the final scale frozen at its cached value, the decomposition is exact."""
    model, batch = tiny_model(norm), make_batch()
    out = dla_per_token(model, batch.tokens, batch.targets, relative_to_mean=relative)
    with torch.no_grad():
        logits = model(batch.tokens)
    if relative:
        logits = logits - logits.mean(-1, keepdim=True)
    target_logit = logits.gather(-1, batch.targets[..., None])[..., 0]
    assert torch.allclose(out.target_logit, target_logit, atol=1e-5)
    assert torch.allclose(out.dla.sum(0) + out.logit_bias, target_logit, atol=1e-4)
    if norm is None:  # nothing frozen: the logit is the components plus b_U[target], exactly
        b_U = model.b_U - (model.b_U.mean() if relative else 0)
        assert torch.allclose(out.logit_bias, b_U[batch.targets])


def test_matches_transformer_lens_cache_methods():
    model = fold(tiny_model("LN"), make_batch().tokens).model
    batch = make_batch(seed=1)
    out = dla_per_token(model, batch.tokens, batch.targets)
    _, cache = model.run_with_cache(batch.tokens)
    stack, labels = cache.get_full_resid_decomposition(expand_neurons=False, return_labels=True)
    ref = cache.logit_attrs(stack, tokens=batch.targets)  # apply_ln_to_stack with the cached scale
    assert set(labels) == set(out.labels)
    for i, label in enumerate(out.labels):
        assert torch.allclose(out.dla[i], ref[labels.index(label)], atol=1e-4), label


def test_folding_keeps_the_attribution_relative_to_the_vocab_mean():
    model, batch = tiny_model("LN", seed=2), make_batch(seed=2)
    folded = fold(model, batch).model
    a = dla_per_token(model, batch.tokens, batch.targets, relative_to_mean=True)
    b = dla_per_token(folded, batch.tokens, batch.targets, relative_to_mean=True)
    assert a.labels == b.labels
    # Folding moves ln1.b @ W_V (and b_V) from each head's z into b_O: heads + bias agree as a
    # whole; embeddings and MLP outputs agree one by one (centring does not change an LN-read DLA).
    heads = [i for i, label in enumerate(a.labels) if label[0] == "L" or label == "bias"]
    others = [i for i in range(len(a.labels)) if i not in heads]
    assert torch.allclose(a.dla[others], b.dla[others], atol=1e-4)
    assert torch.allclose(a.dla[heads].sum(0), b.dla[heads].sum(0), atol=1e-4)
    assert torch.allclose(a.dla.sum(0) + a.logit_bias, b.dla.sum(0) + b.logit_bias, atol=1e-4)


def test_labels_follow_the_model():
    batch = make_batch(n=2)
    labels = dla_per_token(tiny_model("LN", pos="none", attn_only=True), batch.tokens, batch.targets).labels
    assert labels == ["embed", "L0H0", "L0H1", "L1H0", "L1H1", "bias"]
    labels = dla_per_token(tiny_model("LN"), batch.tokens, batch.targets).labels
    assert labels == ["embed", "pos_embed", "L0H0", "L0H1", "0_mlp_out", "L1H0", "L1H1", "1_mlp_out", "bias"]


def test_aggregate_is_the_masked_mean_of_per_token_dla():
    model, batch = tiny_model("RMS", seed=3), make_batch(n=7, seed=3)
    res = direct_logit_attribution(model, batch, chunk_size=3)
    out = dla_per_token(model, batch.tokens, batch.targets)
    mask = batch.loss_mask.float()
    assert torch.allclose(res.mean, (out.dla * mask).sum((1, 2)) / mask.sum(), atol=1e-5)
    per_pos = (out.dla * mask).sum(1) / mask.sum(0)
    assert torch.allclose(res.per_pos[:, 1:], per_pos[:, 1:], atol=1e-5)
    assert torch.isnan(res.per_pos[:, 0]).all()  # position 0 is never masked in
    assert res.mean.sum().item() + res.logit_bias_mean == pytest.approx(res.target_logit_mean, abs=1e-4)
    assert res.n_positions == int(batch.loss_mask.sum())
    json.dumps(res.to_dict())
    assert set(res.figures()) == {"dla/components", "dla/per_pos"}


def masked_ce(logits, batch):
    return F.cross_entropy(logits[batch.loss_mask], batch.targets[batch.loss_mask]).item()


@pytest.mark.parametrize("norm", ["LN", None])
def test_logit_lens(norm):
    model, batch = tiny_model(norm, seed=4), make_batch(n=7, seed=4)
    res = logit_lens(model, batch, chunk_size=3)
    assert res.labels == ["0_pre", "1_pre", "final_post"]
    with torch.no_grad():
        logits, cache = model.run_with_cache(batch.tokens)
    assert res.loss[-1].item() == pytest.approx(masked_ce(logits, batch), abs=1e-5)
    assert res.model_loss == pytest.approx(masked_ce(logits, batch), abs=1e-5)
    # every stage equals TransformerLens's logit lens: accumulated_resid(apply_ln=True) then unembed
    accum, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
    assert labels == res.labels
    for i in range(len(labels)):
        stage_logits = accum[i] @ model.W_U + model.b_U
        assert res.loss[i].item() == pytest.approx(masked_ce(stage_logits, batch), abs=1e-5)
        acc = (stage_logits.argmax(-1) == batch.targets)[batch.loss_mask].float().mean().item()
        assert res.accuracy[i].item() == pytest.approx(acc, abs=1e-6)
    assert res.loss_per_pos.shape == (3, N_CTX) and torch.isnan(res.loss_per_pos[:, 0]).all()
    json.dumps(res.to_dict())
    assert len(res.figures()) == 3


@pytest.mark.parametrize("name", ["ln-standard-gelu", "rmspre-gelu_new", "inverse-layer-scale", "bidirectional",
                                  "dmodel-ne-heads", "rotary", "pos-none", "attn-only"])
def test_dla_and_logit_lens_over_the_engine_matrix(name):
    from toylens.model.zoo import random_model

    model = random_model(name, d_vocab=VOCAB, n_ctx=N_CTX).to(torch.float64, print_details=False)
    batch = make_batch(seed=2)
    if model.cfg.normalization_type in ("LN", "RMS"):  # TL's logit_attrs leaves out ln_final's w: fold it
        model = fold(model, batch.tokens, tol=1e-5).model
    out = dla_per_token(model, batch.tokens, batch.targets)
    with torch.no_grad():
        logits, cache = model.run_with_cache(batch.tokens)
    target_logit = logits.gather(-1, batch.targets[..., None])[..., 0]
    torch.testing.assert_close(out.dla.sum(0) + out.logit_bias, target_logit, atol=1e-6, rtol=1e-6)
    stack, labels = cache.get_full_resid_decomposition(expand_neurons=False, return_labels=True)
    ref = cache.logit_attrs(stack, tokens=batch.targets)  # TransformerLens's own DLA
    assert set(out.labels) <= set(labels)
    for extra in set(labels) - set(out.labels):  # positional "none": TL's pos_embed row is all zero
        assert extra == "pos_embed" and ref[labels.index(extra)].abs().max() == 0
    for i, label in enumerate(out.labels):
        torch.testing.assert_close(out.dla[i], ref[labels.index(label)], atol=1e-6, rtol=1e-6, msg=label)
    lens = logit_lens(model, batch)
    assert lens.model_loss == pytest.approx(lens.loss[-1].item(), abs=1e-5)
