"""SAEs on toylens models (toylens.analyze.sae): the splice path against a hand-written one, CE loss recovered on
planted SAEs (identity -> 1, zero output -> 0), and SAELens recovering planted sparse directions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sae_lens")

from toylens.analyze.sae import SAESettings, evaluate_sae, sae_hooks, spliced_loss, train_sae  # noqa: E402
from toylens.runs.run import load_run  # noqa: E402

HOOK = "blocks.0.hook_mlp_out"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_run):
    run = load_run(tiny_run(tmp_path_factory.mktemp("sae") / "run"))
    return run.model(), run.batch(24)


def make_sae(d_in: int, d_sae: int, seed: int = 0, apply_b_dec_to_input: bool = True):
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=apply_b_dec_to_input))
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec):
            p.copy_(torch.randn_like(p) * 0.3)
    return sae


def manual_loss(model, batch, hook_fn=None) -> float:
    hooks = [] if hook_fn is None else [(HOOK, hook_fn)]
    logits = model.run_with_hooks(batch.tokens, fwd_hooks=hooks)
    return float(F.cross_entropy(logits[batch.loss_mask], batch.targets[batch.loss_mask]))


def test_spliced_reconstruction_equals_a_manual_run_with_hooks_splice(tiny):
    model, batch = tiny
    sae = make_sae(model.cfg.d_model, 48)
    w_enc, b_enc, w_dec, b_dec = (p.detach().clone() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))

    def by_hand(x, hook):  # the standard SAE written out, independent of SAELens
        return torch.relu((x - b_dec) @ w_enc + b_enc) @ w_dec + b_dec

    def ablate_7(x, hook):
        f7 = torch.relu((x - b_dec) @ w_enc + b_enc)[..., 7]
        return x - f7[..., None] * w_dec[7]

    with torch.no_grad():
        assert spliced_loss(model, sae, HOOK, batch, "sae") == pytest.approx(manual_loss(model, batch, by_hand),
                                                                            abs=1e-6)
        assert spliced_loss(model, sae, HOOK, batch, "ablate", latent=7) == pytest.approx(
            manual_loss(model, batch, ablate_7), abs=1e-6)
        clean, spliced = manual_loss(model, batch), manual_loss(model, batch, by_hand)
    assert spliced_loss(model, sae, HOOK, batch, "clean") == pytest.approx(clean, abs=1e-6)
    assert abs(spliced - clean) > 1e-3  # the random SAE does change the loss: the splice is really in the path


def test_ce_loss_recovered_is_one_for_an_identity_sae_and_zero_for_a_zero_sae(tiny):
    model, batch = tiny
    d = model.cfg.d_model
    eye = torch.eye(d)
    identity = make_sae(d, 2 * d, apply_b_dec_to_input=False)
    with torch.no_grad():  # relu(x) - relu(-x) = x: the pairs [I, -I] pass every sign through exactly
        identity.W_enc.copy_(torch.cat([eye, -eye], 1))
        identity.W_dec.copy_(torch.cat([eye, -eye], 0))
        identity.b_enc.zero_()
        identity.b_dec.zero_()
    ev = evaluate_sae(model, identity, HOOK, batch)
    assert ev.ce_zero_ablation - ev.ce_clean > 0.01  # a gap to recover
    assert ev.ce_loss_recovered == pytest.approx(1.0, abs=1e-4)
    assert ev.explained_variance == pytest.approx(1.0, abs=1e-5)
    assert ev.l0 == pytest.approx(d, abs=1.0)  # one of each pair fires per coordinate (exact zeros aside)

    zero = make_sae(d, 2 * d)
    with torch.no_grad():
        zero.W_dec.zero_()
        zero.b_dec.zero_()
    ev0 = evaluate_sae(model, zero, HOOK, batch)
    assert ev0.ce_spliced == pytest.approx(ev0.ce_zero_ablation, abs=1e-6)
    assert ev0.ce_loss_recovered == pytest.approx(0.0, abs=1e-5)


def planted_model(k: int = 8, d_model: int = 16, d_vocab: int = 96, seed: int = 0):
    """A 1-layer model whose hook_mlp_out is a sum of ``k`` known unit directions with sparse non-negative
    coefficients: token t's embedding holds its code c_t (1 or 2 active of k), the MLP passes it through
    (W_in = I, ReLU of non-negative values) and W_out's rows are the directions; attention writes nothing."""
    from toylens.model.build import build_model
    from toylens.runs.config import ModelConfig

    model = build_model(ModelConfig(n_layers=1, d_model=d_model, n_heads=1, d_head=4, d_mlp=k, normalization_type=None,
                                    positional_embedding_type="none"), d_vocab=d_vocab, n_ctx=8, seed=seed)
    g = torch.Generator().manual_seed(seed)
    dirs = F.normalize(torch.randn(k, d_model, generator=g), dim=-1)
    codes = torch.zeros(d_vocab, k)
    for t in range(d_vocab):
        active = torch.randperm(k, generator=g)[: 1 + t % 2]
        codes[t, active] = 0.5 + torch.rand(len(active), generator=g)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.W_E[:, :k] = codes
        model.blocks[0].mlp.W_in[:k, :k] = torch.eye(k)
        model.blocks[0].mlp.W_out[:] = dirs
    return model, dirs, codes


def test_saelens_recovers_planted_sparse_directions():
    model, dirs, codes = planted_model()
    tokens = torch.randint(0, 96, (512, 8), generator=torch.Generator().manual_seed(1))
    acts = model.run_with_cache(tokens[:4], names_filter=HOOK)[1][HOOK]
    assert torch.allclose(acts, codes[tokens[:4]] @ dirs, atol=1e-5)  # the structure really is planted
    s = SAESettings(d_sae=32, l1=1.0, steps=150, batch_tokens=512, lr=3e-3, log_every=50)
    sae, curves = train_sae(model, tokens, HOOK, s)
    w_dec = F.normalize(sae.W_dec.detach(), dim=-1)
    best = (dirs @ w_dec.T).max(-1).values  # for each planted direction, its best-matching latent
    assert best.min() >= 0.9, best
    assert curves.step[-1] == s.steps and curves.explained_variance[-1] > 0.8
    # a shuffled control: random directions are not found
    other = F.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(5)), dim=-1)
    assert (other @ w_dec.T).max(-1).values.mean() < 0.9


def test_sae_hooks_lists_per_position_hooks_only(tiny):
    model, batch = tiny
    hooks = sae_hooks(model, batch.tokens)
    assert hooks[HOOK] == model.cfg.d_model and hooks["blocks.0.mlp.hook_post"] == model.cfg.d_mlp
    assert "blocks.0.attn.hook_pattern" not in hooks and "blocks.0.ln1.hook_scale" not in hooks
    assert "hook_pos_embed" not in hooks  # positional embedding "none": all zeros
