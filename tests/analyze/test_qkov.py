import json

import pytest
import torch

from toylens._compat import HookedTransformerConfig
from toylens.analyze.qkov import circuits
from toylens.model.build import make_model
from toylens.model.fold import fold


def tiny_model(pos="standard", d_vocab=30, attn_only=False, norm="LN", seed=0, **kw):
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=24, n_heads=2, d_head=8, d_vocab=d_vocab, n_ctx=12, normalization_type=norm,
        attn_only=attn_only, seed=seed, **({} if attn_only else dict(d_mlp=48, act_fn="relu")), **kw)
    return make_model(cfg, positional_embedding_type=pos)


def folded(pos="standard", **kw):
    model = tiny_model(pos, **kw)
    return fold(model, torch.randint(0, model.cfg.d_vocab, (4, 12))).model


def close(a, b, rel=1e-4):
    return (a - b).abs().max() <= rel * b.abs().max()


def test_circuit_matrices_equal_hand_matmuls():
    m = folded()
    res = circuits(m)
    W_E, W_U, W_pos = m.W_E, m.W_U, m.W_pos
    assert res.token_ids == list(range(30))
    assert res.qk_token.shape == (2, 2, 30, 30) and res.qk_pos.shape == (2, 2, 12, 12)
    for layer in range(2):
        for h in range(2):
            W_Q, W_K, W_V, W_O = m.W_Q[layer, h], m.W_K[layer, h], m.W_V[layer, h], m.W_O[layer, h]
            with torch.no_grad():
                assert close(res.qk_token[layer, h], W_E @ W_Q @ W_K.T @ W_E.T)
                assert close(res.qk_pos[layer, h], W_pos @ W_Q @ W_K.T @ W_pos.T)
                assert close(res.ov_logit[layer, h], W_E @ W_V @ W_O @ W_U)
                for mlp_layer in range(layer, 2):
                    assert close(res.ov_mlp[(layer, mlp_layer)][h], W_E @ W_V @ W_O @ m.W_in[mlp_layer])
    # the head's own layer's MLP (as in the notebook) and every later one, never an earlier one
    assert set(res.ov_mlp) == {(0, 0), (0, 1), (1, 1)}


def test_scores_equal_dense_references():
    m = folded(d_vocab=40)
    res = circuits(m)
    for layer in range(2):
        for h in range(2):
            with torch.no_grad():
                ov = (m.W_E @ m.W_V[layer, h] @ m.W_O[layer, h] @ m.W_U).double()
            eig = torch.linalg.eigvals(ov)
            ref = (eig.sum().real / eig.abs().sum()).item()
            assert res.copying_score[layer, h].item() == pytest.approx(ref, abs=1e-4)
            top1 = (ov.argmax(-1) == torch.arange(40)).double().mean().item()
            assert res.self_top1_fraction[layer, h].item() == pytest.approx(top1)
            assert -1 <= res.copying_score[layer, h] <= 1


def test_composition_scores_equal_transformer_lens_and_hand_formula():
    m = folded()
    res = circuits(m)
    for mode in "QKV":
        assert torch.allclose(res.composition[mode], m.all_composition_scores(mode), atol=1e-6)
    with torch.no_grad():  # L0H1 -> L1H0 by hand: |W_OV W_QK|_F / (|W_OV|_F |W_QK|_F)
        W_OV = m.W_V[0, 1] @ m.W_O[0, 1]
        right = {"Q": m.W_Q[1, 0] @ m.W_K[1, 0].T, "K": m.W_K[1, 0] @ m.W_Q[1, 0].T,
                 "V": m.W_V[1, 0] @ m.W_O[1, 0]}
    for mode, R in right.items():
        norm = torch.linalg.matrix_norm
        hand = norm(W_OV @ R) / norm(W_OV) / norm(R)
        assert res.composition[mode][0, 1, 1, 0].item() == pytest.approx(hand.item(), rel=1e-4)
    assert torch.all(res.composition["Q"][1, :, 0, :] == 0)  # never from a later to an earlier layer


def test_planted_copying_head_scores_one():
    cfg = HookedTransformerConfig(n_layers=1, d_model=10, n_heads=1, d_head=10, d_vocab=10, n_ctx=4,
                                  normalization_type=None, attn_only=True)
    m = make_model(cfg)
    with torch.no_grad():
        eye = torch.eye(10)
        m.embed.W_E.copy_(eye)
        m.unembed.W_U.copy_(eye)
        m.blocks[0].attn.W_V.copy_(eye[None])
        m.blocks[0].attn.W_O.copy_(2 * eye[None])
    res = circuits(m)
    assert res.copying_score[0, 0].item() == pytest.approx(1.0)
    assert res.self_top1_fraction[0, 0].item() == 1.0
    assert res.ov_mlp == {}  # attn-only


def test_no_positional_circuit_without_positions():
    assert circuits(folded(pos="none")).qk_pos is None
    assert circuits(folded(pos="standard", attn_only=True)).qk_pos is not None


def test_big_vocab_scores_without_matrices_and_token_subset():
    m = folded(d_vocab=50)
    full = circuits(m)
    big = circuits(m, max_vocab=20)
    assert big.qk_token is None and big.ov_logit is None and big.ov_mlp == {} and "max_vocab" in big.note
    assert torch.allclose(big.copying_score, full.copying_score)
    assert torch.equal(big.self_top1_fraction, full.self_top1_fraction)
    sub = [3, 5, 7, 11]
    part = circuits(m, max_vocab=20, token_subset=sub, chunk_size=7)
    idx = torch.tensor(sub)
    assert close(part.qk_token, full.qk_token[:, :, idx][:, :, :, idx])
    assert close(part.ov_logit, full.ov_logit[:, :, idx][:, :, :, idx])
    assert close(part.ov_mlp[(0, 1)], full.ov_mlp[(0, 1)][:, idx])
    assert torch.equal(part.self_top1_fraction, full.self_top1_fraction)  # chunking rows changes nothing


def test_unfolded_model_warns():
    with pytest.warns(UserWarning, match="fold"):
        circuits(tiny_model())


def test_figures_and_to_dict():
    names = [f"t{i}" for i in range(30)]
    res = circuits(folded(), token_names=names)
    d = res.to_dict()
    json.dumps(d)
    assert "qk_token" not in d and set(d["scores_by_head"]) == {"L0H0", "L0H1", "L1H0", "L1H1"}
    figs = res.figures()
    assert {"circuits/qk_token/L1H0", "circuits/qk_pos/L0H1", "circuits/ov_logit/L0H0",
            "circuits/ov_mlp/L0H0->blocks.1.mlp", "circuits/composition_K",
            "circuits/copying_score"} <= set(figs)
    assert list(figs["circuits/qk_token/L0H0"].data[0].x[:2]) == ["t0", "t1"]
