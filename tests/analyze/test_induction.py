import math

import pytest
import torch
import torch.nn.functional as F

from toylens._compat import HookedTransformerConfig
from toylens.analyze.induction import (
    RepeatSpec,
    icl_positions,
    induction_circuit,
    repeat_spec,
    repeated_tokens,
)
from toylens.data import TASKS, make_task
from toylens.model.build import make_model

V, L = 41, 6  # tokens (0 = BOS) and half length: sequences [BOS, x_1..x_6, x_1..x_6]
N = 1 + 2 * L
SPEC = RepeatSpec(half_len=L, low=1, high=V, bos=0)


def planted(scale=100.0, out=10.0, seed=0):
    """2 layers x 2 heads, attention only. L0H1 attends to the previous position and writes the key's
    token into a "previous token" subspace; L1H0 matches the query's token against that subspace
    (K-composition) and copies the key's token to an output subspace the unembedding reads.
    L0H0 and L1H1 are small random heads."""
    d_tok, d_pos = V, N
    tok, pos, prev, outs = 0, d_tok, d_tok + d_pos, d_tok + d_pos + d_tok
    cfg = HookedTransformerConfig(n_layers=2, d_model=outs + d_tok, n_heads=2, d_head=V, d_vocab=V, n_ctx=N,
                                  attn_only=True, normalization_type=None, seed=seed)
    m = make_model(cfg, positional_embedding_type="standard")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        for name in ("W_Q", "W_K", "W_V", "W_O"):
            w = getattr(m.blocks[0].attn, name)
            w[0] = 0.05 * torch.randn(w[0].shape, generator=g)
            w = getattr(m.blocks[1].attn, name)
            w[1] = 0.05 * torch.randn(w[1].shape, generator=g)
        eye = torch.eye(V)
        m.W_E[:, tok:tok + V] = eye
        m.W_pos[:, pos:pos + N] = torch.eye(N)
        m.W_U[outs:outs + V, :] = eye * out
        a0, a1 = m.blocks[0].attn, m.blocks[1].attn
        for i in range(1, N):  # L0H1: query at position i matches key at position i - 1
            a0.W_Q[1, pos + i, i] = scale
            a0.W_K[1, pos + i - 1, i] = 1.0
        a0.W_V[1, tok:tok + V, :V] = eye
        a0.W_O[1, :V, prev:prev + V] = eye
        a1.W_Q[0, tok:tok + V, :V] = eye * scale  # L1H0: query token == key's previous token
        a1.W_K[0, prev:prev + V, :V] = eye
        a1.W_V[0, tok:tok + V, :V] = eye
        a1.W_O[0, :V, outs:outs + V] = eye
    return m.eval()


def direct_scores(pattern, tokens, half, start):
    """Loop-by-loop reference of the three attention scores of one head ``pattern [batch, q, k]``."""
    tot = {"previous_token": [0.0, 0], "induction": [0.0, 0], "prefix_matching": [0.0, 0]}
    b, n = tokens.shape
    for r in range(b):
        for q in range(n):
            if q >= 1:
                tot["previous_token"][0] += float(pattern[r, q, q - 1])
                tot["previous_token"][1] += 1
            if q >= start + half:
                tot["induction"][0] += float(pattern[r, q, q - half + 1])
                tot["induction"][1] += 1
            keys = [k for k in range(1, q) if tokens[r, k - 1] == tokens[r, q]]
            if keys:
                tot["prefix_matching"][0] += sum(float(pattern[r, q, k]) for k in keys)
                tot["prefix_matching"][1] += 1
    return {k: s / c for k, (s, c) in tot.items()}


def test_planted_circuit_scores_and_name():
    m = planted()
    res = induction_circuit(m, SPEC, n_rows=300, seed=1, chunk_size=128)
    s = res.scores
    # the planted head splits its attention evenly over every key k <= q whose previous token is the
    # query's token (k = q included: a doubled token), so its scores follow from the tokens alone
    tokens = repeated_tokens(SPEC, 300, 1)
    ind, pre = [], []
    for r in range(300):
        for q in range(1, N):
            match = [k for k in range(1, q + 1) if tokens[r, k - 1] == tokens[r, q]]
            if q > L:
                ind.append(1 / len(match))
            if [k for k in match if k < q]:
                pre.append(sum(k < q for k in match) / len(match))
    assert s["previous_token"][0, 1] > 0.999
    assert float(s["induction"][1, 0]) == pytest.approx(sum(ind) / len(ind), abs=1e-3)
    assert float(s["prefix_matching"][1, 0]) == pytest.approx(sum(pre) / len(pre), abs=1e-3)
    assert s["previous_token"][0, 0] < 0.5 and s["induction"][1, 1] < 0.5
    assert res.copying[1, 0] == pytest.approx(1.0, abs=1e-5)  # W_E W_OV W_U = out * I
    assert res.copying[0, 1] == pytest.approx(0.0, abs=1e-6)  # writes nothing the unembedding reads
    # ||W_OV W_QK^T||_F / (||W_OV|| ||W_QK||) of two rank-V identity blocks is 1/sqrt(V)
    assert float(res.composition["K"][0, 1, 1, 0]) == pytest.approx(1 / math.sqrt(V), rel=1e-4)
    c = res.circuit
    assert c["found"] and c["induction_head"] == "L1H0" and c["partner_head"] == "L0H1"
    assert c["partner_is_previous_token_head"]
    assert c["line"].startswith("L0H1 (previous token 1.00) → K-composition 0.16 → L1H0 (induction")
    # the repeat is predicted, the first half is not
    assert res.repeated_half_loss < 0.5 and res.first_half_loss > 2.5  # log(40) = 3.7: random
    assert res.icl_score < -2.0


def test_scores_and_losses_equal_direct_computation():
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=3, d_head=8, d_vocab=V, n_ctx=N,
                                  attn_only=True, normalization_type=None, seed=3)
    m = make_model(cfg, positional_embedding_type="standard").eval()
    res = induction_circuit(m, SPEC, n_rows=40, seed=5, chunk_size=16)
    tokens = repeated_tokens(SPEC, 40, 5)
    logits, cache = m.run_with_cache(tokens)
    for layer in range(2):
        for h in range(3):
            ref = direct_scores(cache["pattern", layer][:, h], tokens, L, 1)
            for name, value in ref.items():
                assert float(res.scores[name][layer, h]) == pytest.approx(value, abs=1e-5), (name, layer, h)
            with torch.no_grad():
                ov = (m.W_E @ m.W_V[layer, h] @ m.W_O[layer, h] @ m.W_U).double()
            eig = torch.linalg.eigvals(ov)
            assert float(res.copying[layer, h]) == pytest.approx(
                float(eig.real.clamp(min=0).sum() / eig.abs().sum()), abs=1e-4)
            assert float(res.copying_signed[layer, h]) == pytest.approx(float(eig.sum().real / eig.abs().sum()),
                                                                        abs=1e-4)
    with torch.no_grad():
        for h0 in range(3):
            for h1 in range(3):
                ov = m.W_V[0, h0] @ m.W_O[0, h0]
                qk = m.W_Q[1, h1] @ m.W_K[1, h1].T
                vv = m.W_V[1, h1] @ m.W_O[1, h1]
                for mode, ref in (("K", ov @ qk.T), ("Q", ov @ qk), ("V", ov @ vv)):
                    right = vv if mode == "V" else qk
                    want = ref.norm() / (ov.norm() * right.norm())
                    assert float(res.composition[mode][0, h0, 1, h1]) == pytest.approx(float(want), rel=1e-4)
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none").reshape(40, -1)
    per_pos = nll.mean(0)
    assert torch.allclose(res.loss_by_pos, per_pos, atol=1e-5)
    early, late = icl_positions(N - 1)
    assert (early, late) == (1, 11)  # round(12 * 50/512); round(12 * 500/512) = 12, past the last index
    assert res.icl_score == pytest.approx(float(per_pos[11] - per_pos[1]), abs=1e-5)
    assert res.repeated_half_loss == pytest.approx(float(nll[:, 1 + L:N - 1].mean()), abs=1e-5)


def test_repeat_spec_fits_only_repeat_tasks():
    cls = TASKS["induction"].config_cls
    spec, why = repeat_spec(make_task(cls(n_symbols=20, half_len=8, layout="fixed")))
    assert why == "" and spec == RepeatSpec(half_len=6, low=1, high=21, bos=0)  # not the trained offset 8
    spec, why = repeat_spec(make_task(cls(n_symbols=20, half_len=8, layout="random", pad=4)))
    assert why == "" and spec == RepeatSpec(half_len=8, low=1, high=21, bos=0)
    tokens = repeated_tokens(spec, 5, 0)
    assert tokens.shape == (5, 17) and (tokens[:, 0] == 0).all()
    assert (tokens[:, 1:9] == tokens[:, 9:]).all() and tokens[:, 1:].min() >= 1 and tokens[:, 1:].max() <= 20
    spec, why = repeat_spec(make_task(TASKS["modular_add"].config_cls(p=7)))
    assert spec is None and "modular_add" in why and "repeated" in why


def planted_split(scale=100.0, out=10.0):
    """``planted`` with its previous-token head split in two: L0H0 and L0H1 each attend half to the previous
    position and half to BOS (whose value is zero), each writing half the previous token; L1H0 reads their sum."""
    m = planted(scale, out)
    d_tok, d_pos = V, N
    pos, prev = d_tok, d_tok + d_pos
    eye = torch.eye(V)
    with torch.no_grad():
        for h in (0, 1):
            a0 = m.blocks[0].attn
            for name in ("W_Q", "W_K", "W_V", "W_O"):
                getattr(a0, name)[h] = 0.0
            for i in range(1, N):
                a0.W_Q[h, pos + i, i] = scale
                a0.W_K[h, pos + i - 1, i] = 1.0
                a0.W_K[h, pos + 0, i] = 1.0  # BOS ties with the previous position: half the attention each
            a0.W_V[h, 1:V, 1:V] = eye[1:, 1:]  # BOS (token 0) carries no value
            a0.W_O[h, :V, prev:prev + V] = eye
    return m.eval()


def test_split_previous_token_heads_are_both_named():
    from toylens.analyze.induction import CARRIER_MIN, CARRIER_SHARE

    m = planted_split()
    res = induction_circuit(m, SPEC, n_rows=200, seed=1, chunk_size=100)
    s = res.scores["previous_token"]
    # half the attention on the previous position, except at q = 1 where the previous position is BOS itself
    want = (1.0 + 0.5 * (N - 2)) / (N - 1)
    assert float(s[0, 0]) == pytest.approx(want, abs=1e-3) and float(s[0, 1]) == pytest.approx(want, abs=1e-3)
    c = res.circuit
    assert [h["head"] for h in c["previous_token_heads"]] in (["L0H0", "L0H1"], ["L0H1", "L0H0"])
    assert c["previous_token_split"] and not c["induction_split"]
    assert [h["head"] for h in c["induction_heads"]] == ["L1H0"]
    line = c["line"]
    assert line.startswith("previous-token attention split: L0H")
    assert "L0H0 0.54" in line and "L0H1 0.54" in line and "L1H0 (induction" in line
    assert "L0H0→L1H0" in line and "L0H1→L1H0" in line and "composition K/Q/V" in line
    assert {(p["src"], p["dst"]) for p in c["pairs"]} == {("L0H0", "L1H0"), ("L0H1", "L1H0")}
    assert str(CARRIER_SHARE) in c["rule"] and str(CARRIER_MIN) in c["rule"]
    assert res.repeated_half_loss < 0.5  # the two halves together still make the circuit work


def test_carriers_rule():
    from toylens.analyze.induction import carriers

    labels = ["L0H0", "L0H1", "L0H2", "L1H0", "L1H1", "L1H2"]
    got = carriers(labels, torch.tensor([[0.45, 0.51, 0.2], [0.9, 0.1, 0.1]]), range(1))
    assert [h["head"] for h in got] == ["L0H1", "L0H0"]  # 0.2 < 0.5 x 0.51; layer 1 not asked for
    weak = carriers(labels, torch.full((2, 3), 0.1), range(1))
    assert len(weak) == 1 and weak[0]["weak"]


def test_composition_patching_finds_k_composition():
    from toylens.analyze.induction import composition_patching, induction_pairs

    task = make_task(TASKS["induction"].config_cls(n_symbols=V - 1, half_len=L, layout="fixed"))
    m = planted()
    res = induction_circuit(m, SPEC, n_rows=100, seed=1)
    pairs = induction_pairs(task, 64, 0)
    assert (pairs.answers[:, 0, 0] != pairs.answers[:, 1, 0]).all()
    p = composition_patching(m, pairs, res.circuit)
    assert p["relies_on"] == "K" and p["K"]["recovered"] < 0.2 and p["V"]["recovered"] > 0.9
    # task-batch scores: the planted previous-token head is one on the task's rows too
    batch = task.sample(64, torch.Generator().manual_seed(0))
    res = induction_circuit(m, SPEC, n_rows=50, seed=1, task_batch=batch)
    assert float(res.task_scores["previous_token"][0, 1]) > 0.99
    assert res.task_carriers["previous_token"][0]["head"] == "L0H1"
    assert "task_scores_by_head" in res.to_dict()
