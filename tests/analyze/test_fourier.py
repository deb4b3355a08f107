import math

import pytest
import torch
import torch.nn.functional as F

from toylens._compat import HookedTransformerConfig
from toylens.analyze.fourier import (
    embedding_by_freq,
    excluded_logits,
    fourier_analysis,
    fourier_basis,
    grid,
    key_frequencies,
    neuron_freq_fraction,
    restricted_logits,
)
from toylens.data import TASKS, make_task
from toylens.model.build import make_model

P = 23
W = 2 * math.pi / P


@pytest.mark.parametrize("p", [7, 8, 23])
def test_basis_is_orthonormal_and_named(p):
    basis, names, freq = fourier_basis(p)
    assert torch.allclose(basis @ basis.T, torch.eye(p), atol=1e-5)
    assert names[:3] == ["const", "cos 1", "sin 1"] and len(names) == p
    assert freq.max() == p // 2
    x = torch.arange(p)
    assert torch.allclose(basis[3], torch.cos(2 * 2 * math.pi * x / p) * math.sqrt(2 / p), atol=1e-5)  # cos 2


def planted_embedding(freqs, d_model=32, noise=0.01, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.arange(P, dtype=torch.float32)
    W_E = noise * torch.randn(P, d_model, generator=g)
    for k in freqs:
        W_E += torch.outer(torch.cos(W * k * x), torch.randn(d_model, generator=g))
        W_E += torch.outer(torch.sin(W * k * x), torch.randn(d_model, generator=g))
    return W_E


def test_planted_embedding_gives_its_frequencies():
    W_E = planted_embedding([3, 7])
    by_basis, sq = embedding_by_freq(W_E)
    assert key_frequencies(sq) == [3, 7]
    # direct: squared norm per frequency = |<cos k, W_E>|² + |<sin k, W_E>|² with normalised vectors
    x = torch.arange(P, dtype=torch.float32)
    for k in (1, 3, 7):
        c, s = torch.cos(W * k * x), torch.sin(W * k * x)
        ref = ((c / c.norm()) @ W_E).pow(2).sum() + ((s / s.norm()) @ W_E).pow(2).sum()
        assert float(sq[k]) == pytest.approx(float(ref), rel=1e-4)
    assert float(sq.sum()) == pytest.approx(float(W_E.pow(2).sum()), rel=1e-4)  # Parseval
    assert key_frequencies(embedding_by_freq(torch.randn(P, 64))[1]) == []  # no structure, no key frequency


def test_neuron_fraction_equals_least_squares_fit():
    a = torch.arange(P, dtype=torch.float32)[:, None].expand(P, P)
    b = torch.arange(P, dtype=torch.float32)[None, :].expand(P, P)
    g = torch.Generator().manual_seed(0)
    acts = torch.stack([torch.relu(torch.cos(W * 5 * (a + b) + 0.3)),  # ReLU of one frequency: mostly k=5
                        torch.cos(W * 2 * a) + torch.sin(W * 2 * b) * torch.cos(W * 2 * a),  # exactly k=2
                        torch.randn(P, P, generator=g),
                        torch.cos(W * 4 * a) + torch.cos(W * 9 * b)], dim=-1)
    frac = neuron_freq_fraction(acts)
    assert float(frac[2, 1]) == pytest.approx(1.0, abs=1e-5)
    assert float(frac[4, 3]) == pytest.approx(0.5, abs=1e-5) and float(frac[9, 3]) == pytest.approx(0.5, abs=1e-5)
    # direct: 1 - residual variance of the least-squares fit on {1, cos/sin ka, cos/sin kb, products}
    for k in (2, 5, 9):
        fa = [torch.ones(P, P), torch.cos(W * k * a), torch.sin(W * k * a)]
        fb = [torch.ones(P, P), torch.cos(W * k * b), torch.sin(W * k * b)]
        X = torch.stack([u * v for u in fa for v in fb], -1).reshape(P * P, -1).double()
        for n in range(acts.shape[-1]):
            y = acts[..., n].reshape(-1).double()
            fit = X @ torch.linalg.lstsq(X, y[:, None]).solution
            want = 1 - (y - fit[:, 0]).pow(2).sum() / (y - y.mean()).pow(2).sum()
            assert float(frac[k, n]) == pytest.approx(float(want), abs=1e-4), (k, n)
    assert float(frac[5, 0]) > 0.8


def test_restricted_and_excluded_logits_split_the_key_part():
    c = torch.arange(P + 1, dtype=torch.float32)
    a = torch.arange(P, dtype=torch.float32).repeat_interleave(P)[:, None]
    b = torch.arange(P, dtype=torch.float32).repeat(P)[:, None]
    key = 3 * torch.cos(W * 4 * (a + b - c)) + 2 * torch.cos(W * 6 * (a + b - c))
    other = torch.cos(W * 1 * (a - c)) + 0.5 * torch.sin(W * 2 * b) + 0.7 * c / P  # the last: a per-output bias
    logits = key + other
    r, e = restricted_logits(logits, P, [4, 6]), excluded_logits(logits, P, [4, 6])
    assert torch.allclose(e, other, atol=1e-4)
    assert torch.allclose(r, key + other.mean(0, keepdim=True), atol=1e-4)
    assert torch.allclose(r + e - logits.mean(0, keepdim=True), logits, atol=1e-4)


def test_fourier_analysis_matches_direct_forward():
    task = make_task(TASKS["modular_add"].config_cls(p=P, frac_train=0.3, split_seed=1))
    cfg = HookedTransformerConfig(n_layers=1, d_model=32, n_heads=2, d_head=16, d_mlp=48, d_vocab=P + 1, n_ctx=3,
                                  act_fn="relu", normalization_type=None, seed=0)
    m = make_model(cfg).eval()
    res = fourier_analysis(m, task, key_freqs=[2, 5], chunk_size=100)
    tokens, targets, train = grid(task)
    assert int(train.sum()) == round(0.3 * P * P) and res.key_freqs == [2, 5]
    with torch.no_grad():
        logits, cache = m.run_with_cache(tokens)
    last = logits[:, -1]
    nll = F.cross_entropy(last, targets, reduction="none")
    assert res.losses["loss"]["train"] == pytest.approx(float(nll[train].mean()), rel=1e-5)
    assert res.losses["loss"]["test"] == pytest.approx(float(nll[~train].mean()), rel=1e-5)
    ex = F.cross_entropy(excluded_logits(last, P, [2, 5]), targets, reduction="none")
    assert res.losses["excluded"]["test"] == pytest.approx(float(ex[~train].mean()), rel=1e-5)
    acts = cache["post", 0][:, -1].reshape(P, P, -1)
    assert torch.allclose(res.neuron_frac, neuron_freq_fraction(acts), atol=1e-5, equal_nan=True)
    assert res.sum_sq_weights == pytest.approx(sum(float(p.pow(2).sum()) for p in m.parameters()), rel=1e-5)
    assert sum(res.clusters.values()) == 48
