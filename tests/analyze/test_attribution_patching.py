"""Attribution patching: exact where the model is linear, the true first-order term elsewhere, and
aligned entry by entry with the exact sweeps."""

from __future__ import annotations

import json

import pytest
import torch

from toylens._compat import HookedTransformerConfig
from toylens.analyze.attribution_patching import attribution_patch, correlation
from toylens.analyze.metrics import tl_metric
from toylens.analyze.pairs import PromptPairs
from toylens.analyze.patching import EVERY, KINDS, PatchingError, patch
from toylens.analyze.patching.engine import hook_name
from toylens.model.build import make_model

VOCAB, N_POS = 19, 7


def model_(attn_only=False, norm="LN", dtype=torch.float32, seed=0):
    cfg = HookedTransformerConfig(n_layers=2, d_model=16, d_head=8, n_heads=2, d_mlp=None if attn_only else 32,
                                  d_vocab=VOCAB, n_ctx=8, act_fn="gelu", normalization_type=norm,
                                  attn_only=attn_only, seed=seed, dtype=dtype, initializer_range=0.3)
    return make_model(cfg).eval()


def pairs_(seed=0) -> PromptPairs:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, VOCAB, (3, N_POS), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2:] = torch.randint(0, VOCAB, (3, N_POS - 2), generator=g)
    answers = torch.randint(0, VOCAB, (3, 2, 2), generator=g)
    answers[1, 0, 1] = -1
    return PromptPairs(clean, corrupted, torch.tensor([6, 5, 6]), answers)


def test_estimate_is_exact_for_a_linear_model():
    """Attention-only, no LayerNorm, W_Q = b_Q = 0 (uniform causal attention): logits are linear in
    every residual, attention output, z and v, and logit_diff is linear in the logits."""
    model = model_(attn_only=True, norm=None).to(torch.float64, print_details=False)  # exact: no rounding left
    with torch.no_grad():
        for block in model.blocks:
            block.attn.W_Q.zero_()
            block.attn.b_Q.zero_()
    pairs = pairs_()
    est = attribution_patch(model, pairs, ["resid_pre", "resid_post", "attn_out", "z_all_pos", "z_by_pos",
                                           "v_all_pos", "v_by_pos", "attn_head_all_pos_every"])
    for kind, r in est.results.items():
        exact = patch(model, pairs, kind, progress=False)
        assert r.values.shape == exact.values.shape and r.dims == exact.dims and r.labels == exact.labels
        assert (r.values - exact.values).abs().max() <= 1e-5, kind
        if kind in ("resid_pre", "z_by_pos", "v_all_pos"):
            assert correlation(r, exact) > 0.99999 and exact.values.abs().max() > 0.1
    # q, k and pattern cannot move a uniform pattern: exactly zero effect, estimated and exact
    every = est["attn_head_all_pos_every"]
    assert torch.equal(every.values[1:3], torch.zeros_like(every.values[1:3]))
    assert torch.equal(every.values[4], torch.zeros_like(every.values[4]))


@pytest.mark.parametrize("kind, index", [("resid_pre", (1, 3)), ("mlp_out", (0, 6)), ("attn_out", (1, 6)),
                                         ("z_by_pos", (0, 2, 1)), ("k_all_pos", (0, 1)), ("q_by_pos", (1, 6, 0)),
                                         ("v_by_pos", (0, 3, 0)), ("pattern_by_pos", (1, 0, 5)),
                                         ("pattern_dest_src", (0, 1, 4, 2))])
def test_estimate_is_the_first_order_term(kind, index):
    """In float64: the estimate equals the derivative of the metric along corrupted -> clean at the
    patched slice, by central finite differences on ``run_with_hooks`` (an independent reference)."""
    model, pairs = model_(dtype=torch.float64), pairs_(seed=1)
    spec = KINDS[kind]
    raw = patch(model, pairs, kind, normalize=False, progress=False)
    est = attribution_patch(model, pairs, [kind], normalize=False)[kind]
    with torch.no_grad():
        _, cache = model.run_with_cache(pairs.clean)
    name = hook_name(spec.act, index[0])
    metric = tl_metric("logit_diff", pairs)

    def slice_of(act):
        layer, *rest = index
        if spec.act == "pattern":
            return (slice(None), *rest)  # [batch, head_index, dest_pos(, src_pos)]
        if spec.axes == ("layer", "pos"):
            return (slice(None), rest[0])
        if spec.all_pos:
            return (slice(None), slice(None), rest[0])
        return (slice(None), rest[0], rest[1])

    def run(eps):
        def hook(act, hook):
            act = act.clone()
            s = slice_of(act)
            act[s] = act[s] + eps * (cache[name][s] - act[s])
            return act
        with torch.no_grad():
            return metric(model.run_with_hooks(pairs.corrupted, fwd_hooks=[(name, hook)])).item()

    eps = 1e-4
    derivative = (run(eps) - run(-eps)) / (2 * eps)
    assert abs(derivative) > 1e-3  # a patch that matters
    assert est.values[index].item() - est.corrupted_value == pytest.approx(derivative, abs=1e-6)
    assert raw.corrupted_value == pytest.approx(est.corrupted_value, abs=1e-9)
    assert run(1.0) == pytest.approx(raw.values[index].item(), abs=1e-6)  # eps = 1 is the exact patch (float32 values)


def test_results_align_with_exact_sweeps():
    model, pairs = model_(), pairs_(seed=2)
    marker = torch.full_like(model.W_E, 7.0)
    model.embed.W_E.grad = marker.clone()
    est = attribution_patch(model, pairs)  # every kind
    assert torch.equal(model.embed.W_E.grad, marker) and model.blocks[0].attn.W_Q.grad is None  # untouched
    assert set(est.results) == set(KINDS)
    every = attribution_patch(model, pairs, list(EVERY))
    for kind in [*KINDS, *EVERY]:
        r = (every if kind in EVERY else est)[kind]
        exact = patch(model, pairs, kind, progress=False)
        assert r.values.shape == exact.values.shape and r.dims == exact.dims and r.labels == exact.labels, kind
        assert r.method == "attribution patching" and r.normalized
    # positions after every answer and before every difference: no effect, estimated or exact
    assert torch.equal(est["resid_pre"].values[:, :2], torch.zeros(2, 2))
    assert est.clean_value == pytest.approx(exact.clean_value, abs=1e-5)
    assert est.corrupted_value == pytest.approx(exact.corrupted_value, abs=1e-5)
    d = json.loads(json.dumps(est.to_dict()))
    assert set(d["results"]) == set(KINDS)
    figs = every.figures()
    assert "attribution/attn_head_all_pos_every/value_vs_output" in figs and "attribution/resid_pre" in figs


def test_correlation_and_errors():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert correlation(a, 2 * a + 1) == pytest.approx(1.0)
    assert correlation(a, -a) == pytest.approx(-1.0)
    with pytest.raises(PatchingError, match="compare the same kind"):
        correlation(a, a.flatten()[:3])
    model, pairs = model_(attn_only=True), pairs_()
    with pytest.raises(PatchingError, match="attention-only model has no mlp_out"):
        attribution_patch(model, pairs, ["block_every"])
    with pytest.raises(PatchingError, match="kinds: 'resid'"):
        attribution_patch(model, pairs, ["resid"])
    assert "resid_mid" not in attribution_patch(model, pairs).results


@pytest.mark.parametrize("name", ["bidirectional", "inverse-layer-scale", "rotary", "grouped-query", "logit-softcap"])
@pytest.mark.parametrize("kind, index", [("resid_pre", (1, 4)), ("z_by_pos", (1, 5, 1))])
def test_first_order_term_over_the_engine_matrix(name, kind, index):
    """The estimate is the derivative along corrupted -> clean (finite differences on run_with_hooks), and its
    baselines are the exact sweep's, on models of the engine's matrix (a bidirectional one reads every position)."""
    from toylens.model.zoo import random_model

    model = random_model(name, n_layers=2, n_ctx=8, d_vocab=VOCAB).to(torch.float64, print_details=False)
    pairs = pairs_(seed=3)
    est = attribution_patch(model, pairs, [kind], normalize=False)[kind]
    exact = patch(model, pairs, kind, normalize=False, progress=False)
    assert est.clean_value == pytest.approx(exact.clean_value, abs=1e-9)
    assert est.corrupted_value == pytest.approx(exact.corrupted_value, abs=1e-9)
    with torch.no_grad():
        _, cache = model.run_with_cache(pairs.clean)
    hook = hook_name(KINDS[kind].act, index[0])
    at = (slice(None), *index[1:])
    metric = tl_metric("logit_diff", pairs)

    def run(eps):
        def fn(act, hook):
            act = act.clone()
            act[at] = act[at] + eps * (cache[hook.name][at] - act[at])
            return act
        with torch.no_grad():
            return metric(model.run_with_hooks(pairs.corrupted, fwd_hooks=[(hook, fn)])).item()

    eps = 1e-4
    assert est.values[index].item() - est.corrupted_value == pytest.approx((run(eps) - run(-eps)) / (2 * eps),
                                                                           abs=1e-6)
