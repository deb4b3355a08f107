"""Activation patching sweeps against ``transformer_lens.patching`` (the oracle), on random toy models.

Every kind equals TransformerLens's function on the same inputs to 1e-5, on models with LayerNorm,
LNPre, RMS and no normalisation, positional embedding standard / none / rotary, attention-only,
relu / gelu / silu MLPs, and grouped-query attention (the hook path). The prompt pairs exercise the
engine's shortcuts: answers before the last position and before the first corrupted token, a row
whose prompts are identical, multi-token answers with padding.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformer_lens.patching as tlp

from toylens._compat import HookedTransformerConfig
from toylens.analyze.metrics import MetricError, at_answer, tl_metric
from toylens.analyze.pairs import PairsError, PromptPairs
from toylens.analyze.patching import EVERY, KINDS, TL_EVERY, PatchingError, patch, patching_context, value_at
from toylens.analyze.patching.engine import enumerate_patches, make_chunks, plan_items, run_sweep
from toylens.model.build import make_model

VOCAB, N_POS = 23, 7


@pytest.fixture(autouse=True)
def _quiet_tqdm(monkeypatch):
    monkeypatch.setattr(tlp, "tqdm", lambda items, **kwargs: items)  # TL's sweeps draw a bar per call


def toy_model(n_layers=2, norm="LN", pos="standard", attn_only=False, act="gelu", kv_heads=None, seed=0):
    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=16, d_head=8, n_heads=2, d_mlp=None if attn_only else 32, d_vocab=VOCAB,
        n_ctx=8, act_fn=act, normalization_type=norm, attn_only=attn_only, seed=seed, n_key_value_heads=kv_heads,
        positional_embedding_type="rotary" if pos == "rotary" else "standard",
        rotary_dim=8 if pos == "rotary" else None, initializer_range=0.3)  # large init: non-trivial patterns
    return make_model(cfg, positional_embedding_type="none" if pos == "none" else "standard").eval()


def toy_pairs(model, seed=0) -> PromptPairs:
    """Four prompts: corrupted from position 2 (answer at the end), from 4 with the answer at 3 (no
    patch can matter), identical prompts, corrupted from 1 with the answer at 4. Answers of two
    tokens (one padded): first the model's clean top token against its corrupted top token (so the
    normalisation is well conditioned, as in real use), then random tokens."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, VOCAB, (4, N_POS), generator=g)
    corrupted = clean.clone()
    for row, start in ((0, 2), (1, 4), (3, 1)):
        corrupted[row, start:] = (clean[row, start:] + 1 + torch.randint(0, VOCAB - 1, (N_POS - start,),
                                                                          generator=g)) % VOCAB
    corrupted[0, 5] = clean[0, 5]  # a shared token after the first difference
    answer_pos = torch.tensor([6, 3, 5, 4])
    rows = torch.arange(4)
    with torch.no_grad():
        top_clean = model(clean)[rows, answer_pos].argmax(-1)
        corr_logits = model(corrupted)[rows, answer_pos]
        corr_logits[rows, top_clean] = -torch.inf
        top_corrupted = corr_logits.argmax(-1)
    answers = torch.randint(0, VOCAB, (4, 2, 2), generator=g)
    answers[:, 0, 0], answers[:, 1, 0] = top_clean, top_corrupted
    answers[0, 1, 1] = -1
    return PromptPairs(clean, corrupted, answer_pos, answers, str_tokens=[f"t{int(t)}" for t in clean[0]])


def tl_sweep(model, pairs, kind, metric="logit_diff", normalize=True):
    """TransformerLens's sweep for ``kind`` with our metric (mean over prompts at answer_pos)."""
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(pairs.clean)
        raw = tl_metric(metric, pairs)
        fn = tl_metric(metric, pairs, raw(clean_logits).item(), raw(model(pairs.corrupted)).item()) if normalize \
            else raw
        if kind in TL_EVERY:
            return getattr(tlp, TL_EVERY[kind])(model, pairs.corrupted, cache, fn)
        if kind == "resid_post":
            return tlp.generic_activation_patch(model, pairs.corrupted, cache, fn, tlp.layer_pos_patch_setter,
                                                "resid_post", ("layer", "pos"))
        return getattr(tlp, KINDS[kind].tl_function)(model, pairs.corrupted, cache, fn)


def assert_matches_tl(model, pairs, kinds, tol=1e-5, **kwargs):
    for kind in kinds:
        ours = patch(model, pairs, kind, progress=False, **kwargs)
        want = tl_sweep(model, pairs, kind, kwargs.get("metric", "logit_diff"), kwargs.get("normalize", True))
        assert ours.values.shape == want.shape, kind
        err = (ours.values - want).abs().max().item()
        assert err <= tol, f"{kind}: max |ours - TL| = {err:.3g}"


CONFIGS = {
    "ln_gelu": {},
    "pos_none_relu": {"pos": "none", "act": "relu"},
    "rotary": {"pos": "rotary"},
    "attn_only_no_norm": {"attn_only": True, "norm": None},
    "lnpre_3_layers": {"norm": "LNPre", "n_layers": 3, "act": "gelu_new"},
    "rms_silu": {"norm": "RMS", "act": "silu"},
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_kind_equals_transformer_lens(config):
    model = toy_model(**CONFIGS[config])
    pairs = toy_pairs(model)
    ctx = patching_context(model, pairs)
    ctx.prepare([KINDS["resid_pre"]])
    assert ctx.fast
    assert abs(ctx.clean_rows.mean() - ctx.corr_rows.mean()) > 0.5  # the normalisation is meaningful
    kinds = [k for k in KINDS if not (model.cfg.attn_only and k in ("resid_mid", "mlp_out"))]
    if config not in ("ln_gelu", "rotary"):  # its own code path; TL's oracle needs a forward per (dest, src)
        kinds.remove("pattern_dest_src")
    assert_matches_tl(model, pairs, kinds)


def test_hook_engine_equals_transformer_lens():
    model = toy_model(pos="none", act="relu")
    pairs = toy_pairs(model, seed=1)
    assert not patching_context(model, pairs, engine="hooks").fast
    assert_matches_tl(model, pairs, list(KINDS), engine="hooks")


def test_every_sweeps_equal_transformer_lens():
    model = toy_model()
    pairs = toy_pairs(model, seed=2)
    assert_matches_tl(model, pairs, list(EVERY))
    result = patch(model, pairs, "attn_head_by_pos_every", progress=False)
    torch.testing.assert_close(result.sub("pattern_by_pos").values,
                               patch(model, pairs, "pattern_by_pos", progress=False).values)


def test_loss_accuracy_and_custom_metrics_equal_transformer_lens():
    model = toy_model(n_layers=3)
    pairs = toy_pairs(model, seed=3)
    kinds = ["resid_pre", "mlp_out", "z_all_pos", "k_by_pos", "pattern_by_pos"]
    assert_matches_tl(model, pairs, kinds, metric="loss", normalize=False)
    assert_matches_tl(model, pairs, ["resid_pre", "v_all_pos"], metric="accuracy", normalize=False)

    def prob(logits_at_answer, p):  # a callable metric: probability of the first correct token
        return logits_at_answer.softmax(-1).gather(-1, p.answers[:, 0, :1])[:, 0]

    assert_matches_tl(model, pairs, ["resid_mid", "q_by_pos"], metric=prob)


def test_grouped_query_attention_uses_hooks_and_equals_transformer_lens():
    model = toy_model(kv_heads=1)
    pairs = toy_pairs(model, seed=4)
    assert not patching_context(model, pairs).fast
    assert_matches_tl(model, pairs, ["k_all_pos", "v_by_pos", "z_by_pos", "attn_head_all_pos_every"])
    assert patch(model, pairs, "k_by_pos", progress=False).values.shape == (2, N_POS, 1)
    with pytest.raises(PatchingError, match="engine='fast'.*grouped-query"):
        patch(model, pairs, "k_by_pos", engine="fast")


def test_chunk_budget_does_not_change_results():
    model = toy_model(n_layers=3)
    pairs = toy_pairs(model, seed=5)
    ctx = patching_context(model, pairs)
    ctx.prepare([KINDS["k_by_pos"]])
    patches = enumerate_patches(ctx, KINDS["k_by_pos"])
    item_patch, _, p0 = plan_items(ctx, patches)
    tiny, big = (make_chunks(ctx, patches.layer[item_patch], p0, b) for b in (1, 1 << 30))
    assert len(tiny) == len(p0) and len(big) <= 3 * 3  # one item per chunk; at most a chunk per (layer, p0 group)
    for kind in ("resid_pre", "k_by_pos", "pattern_dest_src", "z_all_pos"):
        small = patch(model, pairs, kind, progress=False, chunk_budget_mb=1e-6).values
        large = patch(model, pairs, kind, progress=False, chunk_budget_mb=1024).values
        threaded = patch(model, pairs, kind, progress=False, workers=2, chunk_budget_mb=1e-3).values
        assert (small - large).abs().max() <= 1e-5 and (threaded - large).abs().max() <= 1e-5, kind
    # a subset of the patches (as TL's index_df): the same values there, NaN elsewhere
    spec = KINDS["v_by_pos"]
    full = run_sweep(ctx, spec, 1 << 26, progress=False)
    only = torch.tensor([3, 17, 40])
    part = run_sweep(ctx, spec, 1 << 26, progress=False, only=only)
    torch.testing.assert_close(part.flatten()[only], full.flatten()[only])
    assert part.isnan().sum() == part.numel() - 3


def test_shortcuts_leave_unreachable_patches_at_the_corrupted_value():
    model = toy_model()
    pairs = toy_pairs(model, seed=6)
    raw = patch(model, pairs, "resid_pre", normalize=False, progress=False)
    # position 6 is only seen by prompt 0's answer; positions 0 and 1 are shared by every prompt
    # (clean and corrupted agree there), so patching them changes nothing
    assert torch.equal(raw.values[:, :1], torch.full_like(raw.values[:, :1], raw.corrupted_value))
    norm = patch(model, pairs, "resid_pre", progress=False)
    torch.testing.assert_close(norm.raw(), raw.values)
    # patching every position of the residual stream at layer 0 restores the clean run exactly
    with torch.no_grad():
        tokens = pairs.clean
        _, cache = model.run_with_cache(tokens)
        logits = model.run_with_hooks(pairs.corrupted, fwd_hooks=[(
            "blocks.0.hook_resid_pre", lambda act, hook: cache["blocks.0.hook_resid_pre"])])
    assert tl_metric("logit_diff", pairs)(logits).item() == pytest.approx(raw.clean_value, abs=1e-5)
    assert at_answer(logits, pairs).shape == (4, VOCAB)


def test_result_labels_figures_and_json():
    model = toy_model()
    pairs = toy_pairs(model, seed=7)
    r = patch(model, pairs, "z_by_pos", progress=False)
    assert r.dims == ["layer", "pos", "head_index"] and r.tl_function == "get_act_patch_attn_head_out_by_pos"
    assert r.labels["pos"] == pairs.labels() and r.labels["head_index"] == ["H0", "H1"]
    assert value_at(r, layer=1, pos=3).shape == (2,)
    assert value_at(r, layer=1, pos=3, head_index=0) == r.values[1, 3, 0]
    d = json.loads(json.dumps(r.to_dict()))
    assert d["kind"] == "z_by_pos" and len(d["values"]) == 2 and d["metric"] == "logit_diff"
    fig = r.figures()["patching/z_by_pos"]
    assert list(fig.data[0].y) == ["L0H0", "L0H1", "L1H0", "L1H1"]
    every = patch(model, pairs, "attn_head_all_pos_every", progress=False)
    figs = every.figures()
    assert {"patching/z_all_pos", "patching/v_all_pos", "patching/attn_head_all_pos_every/value_vs_output",
            "patching/attn_head_all_pos_every/pattern_vs_output"} <= set(figs)
    scatter = figs["patching/attn_head_all_pos_every/value_vs_output"].data[0]
    torch.testing.assert_close(torch.tensor(scatter.x, dtype=torch.float32), every.values[3].flatten())
    torch.testing.assert_close(torch.tensor(scatter.y, dtype=torch.float32), every.values[0].flatten())
    assert list(scatter.text) == ["L0H0", "L0H1", "L1H0", "L1H1"]
    assert len(patch(model, pairs, "pattern_dest_src", progress=False).figures()) == 4  # one per head (<= 6)


def test_context_is_shared_between_sweeps():
    model = toy_model()
    pairs = toy_pairs(model, seed=8)
    ctx = patching_context(model, pairs)
    a = patch(model, pairs, "resid_pre", context=ctx, progress=False)
    b = patch(model, pairs, "v_by_pos", context=ctx, progress=False)
    torch.testing.assert_close(a.values, patch(model, pairs, "resid_pre", progress=False).values)
    torch.testing.assert_close(b.values, patch(model, pairs, "v_by_pos", progress=False).values)
    with pytest.raises(PatchingError, match="context: built for another metric"):
        patch(model, pairs, "resid_pre", metric="loss", context=ctx)
    with pytest.raises(PatchingError, match="context: built for another model"):
        patch(toy_model(seed=1), pairs, "resid_pre", context=ctx)


def test_bad_inputs_raise_one_line_errors():
    model = toy_model()
    pairs = toy_pairs(model)
    with pytest.raises(PatchingError, match="kind='resid'.*resid_pre"):
        patch(model, pairs, "resid")
    with pytest.raises(MetricError, match="metric='logitdiff'"):
        patch(model, pairs, "resid_pre", metric="logitdiff")
    with pytest.raises(MetricError, match="one value per prompt.*drop the mean"):
        patch(model, pairs, "resid_pre", metric=lambda logits, p: logits.mean())
    with pytest.raises(PatchingError, match="attention-only model has no resid_mid"):
        patch(toy_model(attn_only=True, norm=None), pairs, "resid_mid")
    with pytest.raises(PatchingError, match="attention-only model has no mlp_out"):
        patch(toy_model(attn_only=True, norm=None), pairs, "block_every")
    with pytest.raises(PatchingError, match="pairs: expected a PromptPairs"):
        patch(model, (pairs.clean, pairs.corrupted), "resid_pre")
    with pytest.raises(PairsError, match="PromptPairs.corrupted: shape"):
        PromptPairs(pairs.clean, pairs.corrupted[:, :-1], pairs.answer_pos, pairs.answers)
    long = torch.zeros(4, 9, dtype=torch.long)
    with pytest.raises(PatchingError, match="9 positions exceed the model's n_ctx=8"):
        patch(model, PromptPairs(long, long + 1, pairs.answer_pos, pairs.answers), "resid_pre")
    big = PromptPairs(pairs.clean, pairs.corrupted, pairs.answer_pos, pairs.answers + VOCAB)
    with pytest.raises(PatchingError, match="beyond the model's vocabulary"):
        patch(model, big, "resid_pre")
    with pytest.raises(PatchingError, match="chunk_budget_mb"):
        patch(model, pairs, "resid_pre", chunk_budget_mb=0)
    with pytest.raises(PatchingError, match="engine='gpu'"):
        patch(model, pairs, "resid_pre", engine="gpu")
    same = PromptPairs(pairs.clean, pairs.clean, pairs.answer_pos, pairs.answers)
    with pytest.raises(MetricError, match="clean and corrupted metric are equal.*normalize=False"):
        patch(model, same, "resid_pre")
    flat = patch(model, same, "resid_pre", normalize=False, progress=False)
    assert torch.equal(flat.values, torch.full_like(flat.values, flat.clean_value))
