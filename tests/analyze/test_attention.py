import json

import pytest
import torch

from toylens._compat import HookedTransformerConfig
from toylens.analyze.attention import SCORE_NAMES, attention_patterns, head_scores
from toylens.data.base import Batch
from toylens.model.build import make_model

N_CTX = 12


def planted_model():
    """1-layer attn-only model, weights set by hand: head 0 attends query i -> key i-1, head 1 -> key 0."""
    cfg = HookedTransformerConfig(n_layers=1, d_model=N_CTX, n_heads=2, d_head=N_CTX, d_vocab=20,
                                  n_ctx=N_CTX, normalization_type=None, attn_only=True)
    m = make_model(cfg)
    c = 10.0  # q.k = c^2 = 100 on the planted key, 0 elsewhere: a logit gap of 100 / sqrt(d_head)
    attn = m.blocks[0].attn
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.pos_embed.W_pos.copy_(torch.eye(N_CTX))  # position i is the basis vector e_i
        attn.W_Q[0].copy_(c * torch.eye(N_CTX))  # head 0: query i -> e_i
        attn.W_K[0].copy_(c * torch.diag(torch.ones(N_CTX - 1), 1))  # key j -> e_{j+1}
        attn.W_Q[1, :, 0] = c  # head 1: every query -> e_0
        attn.W_K[1, 0, 0] = c  # only key 0 -> e_0
    return m


def random_tokens(n=8, vocab=20, seed=0):
    return torch.randint(0, vocab, (n, N_CTX), generator=torch.Generator().manual_seed(seed))


def test_planted_previous_token_and_first_token_heads():
    res = attention_patterns(planted_model(), random_tokens())
    s = res.scores
    assert s["previous_token"][0, 0] > 0.95 and s["current_token"][0, 0] < 0.05
    assert s["first_token"][0, 1] > 0.95 and s["current_token"][0, 1] < 0.05
    # the two only meet at query 1, whose previous token is key 0: 1 query in 11
    assert s["first_token"][0, 0].item() == pytest.approx(1 / 11, abs=1e-3)
    assert s["previous_token"][0, 1].item() == pytest.approx(1 / 11, abs=1e-3)
    assert res.mean_pattern[0, 0, 5, 4] > 0.95 and res.mean_pattern[0, 1, 5, 0] > 0.95


def naive_scores(pattern, tokens):
    """Obviously-correct loops over rows, heads and queries."""
    b, n_heads, n, _ = pattern.shape
    out = {}
    for name in SCORE_NAMES:
        sums, count = torch.zeros(n_heads, dtype=torch.float64), 0
        for r in range(b):
            t = tokens[r].tolist()
            for q in range(n):
                if name == "previous_token":
                    keys = [q - 1] if q >= 1 else []
                elif name == "current_token":
                    keys = [q] if q >= 1 else []
                elif name == "first_token":
                    keys = [0] if q >= 1 else []
                elif name == "duplicate_token":
                    keys = [k for k in range(q) if t[k] == t[q]]
                else:  # induction: the key right after an earlier occurrence, itself before the query
                    keys = [j + 1 for j in range(q) if t[j] == t[q] and j + 1 < q]
                if not keys:
                    continue
                count += 1
                for h in range(n_heads):
                    sums[h] += sum(float(pattern[r, h, q, k]) for k in keys)
        out[name] = sums / count if count else torch.full((n_heads,), float("nan"), dtype=torch.float64)
    return out


def random_pattern(b, n_heads, n, seed=0):
    scores = torch.randn(b, n_heads, n, n, generator=torch.Generator().manual_seed(seed)) * 3
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


def test_head_scores_match_naive_loop():
    tokens = random_tokens(5, vocab=4, seed=1)  # small vocab: plenty of duplicates
    pattern = random_pattern(5, 3, N_CTX)
    fast, slow = head_scores(pattern, tokens), naive_scores(pattern, tokens)
    for name in SCORE_NAMES:
        assert torch.allclose(fast[name].double(), slow[name], atol=1e-6), name
        assert torch.all((fast[name] >= 0) & (fast[name] <= 1 + 1e-6))


def test_hand_built_duplicate_and_induction_patterns():
    # tokens A B C A B C: query 3 (A) duplicates key 0, its induction key is 1 (the B after the first A).
    tokens = torch.tensor([[0, 1, 2, 0, 1, 2]])
    n = 6
    dup = torch.zeros(1, 1, n, n)
    ind = torch.zeros(1, 1, n, n)
    for q in range(n):
        dup[0, 0, q, q - 3 if q >= 3 else 0] = 1.0
        ind[0, 0, q, q - 2 if q >= 3 else 0] = 1.0
    assert head_scores(dup, tokens)["duplicate_token"].item() == pytest.approx(1.0)
    assert head_scores(dup, tokens)["induction"].item() == pytest.approx(0.0)
    assert head_scores(ind, tokens)["induction"].item() == pytest.approx(1.0)
    assert head_scores(ind, tokens)["duplicate_token"].item() == pytest.approx(0.0)
    # no repeats at all: the score is undefined, not 0
    assert torch.isnan(head_scores(dup, torch.arange(6)[None])["induction"]).all()


def random_model(seed=0):
    cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=10,
                                  n_ctx=N_CTX, act_fn="relu", normalization_type="LN", seed=seed)
    return make_model(cfg, positional_embedding_type="none")


def test_mean_pattern_and_scores_match_cached_run():
    m, tokens = random_model(), random_tokens(7, vocab=10, seed=2)
    batch = Batch(tokens, tokens, torch.ones_like(tokens, dtype=torch.bool))
    res = attention_patterns(m, batch, chunk_size=3)
    _, cache = m.run_with_cache(tokens)
    for layer in range(2):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        assert torch.allclose(res.mean_pattern[layer], pattern.mean(0), atol=1e-6)
        ref = naive_scores(pattern, tokens)
        for name in SCORE_NAMES:
            assert torch.allclose(res.scores[name][layer].double(), ref[name], atol=1e-5), name
    assert res.mean_pattern.shape == (2, 2, N_CTX, N_CTX) and res.n_rows == 7
    assert res.head_labels == ["L0H0", "L0H1", "L1H0", "L1H1"]


def test_figures_and_to_dict():
    res = attention_patterns(random_model(1), random_tokens(3, vocab=10))
    d = res.to_dict()
    json.dumps(d)
    assert set(d["scores_by_head"]["L1H0"]) == set(SCORE_NAMES)
    figs = res.figures()
    assert {"attention/L0H0", "attention/L1H1", "attention/layer0_mean", "attention/head_scores"} <= set(figs)
