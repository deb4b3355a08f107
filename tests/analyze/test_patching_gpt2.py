"""Patching on a randomly initialised GPT-2-shaped model (12 layers x 768, 12 heads, d_mlp 3072) built
in-process, against ``transformer_lens.patching``.

The default test checks every sweep kind on a random subset of its patches (TransformerLens's
``generic_activation_patch`` with an ``index_df``: one full forward per patch is what makes the
oracle slow); the ``slow`` test runs TransformerLens's complete functions.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import transformer_lens.patching as tlp

from toylens._compat import HookedTransformerConfig
from toylens.analyze.metrics import tl_metric
from toylens.analyze.pairs import PromptPairs
from toylens.analyze.patching import EVERY, KINDS, TL_EVERY, patch, patching_context
from toylens.analyze.patching.engine import enumerate_patches, run_sweep
from toylens.model.build import make_model

N_POS = 5
SETTERS = {"resid_pre": tlp.layer_pos_patch_setter, "attn_out": tlp.layer_pos_patch_setter,
           "mlp_out": tlp.layer_pos_patch_setter, "z_all_pos": tlp.layer_head_vector_patch_setter,
           "pattern_all_pos": tlp.layer_head_pattern_patch_setter, "q_by_pos": tlp.layer_pos_head_vector_patch_setter,
           "k_by_pos": tlp.layer_pos_head_vector_patch_setter, "v_by_pos": tlp.layer_pos_head_vector_patch_setter,
           "pattern_by_pos": tlp.layer_head_pos_pattern_patch_setter}
TL_AXES = {("layer", "head_index"): ["layer", "head"], ("layer", "pos", "head_index"): ["layer", "pos", "head"]}


@pytest.fixture(autouse=True)
def _quiet_tqdm(monkeypatch):
    monkeypatch.setattr(tlp, "tqdm", lambda items, **kwargs: items)  # TL's sweeps draw a bar per call


@pytest.fixture(scope="module")
def gpt2():
    cfg = HookedTransformerConfig(n_layers=12, d_model=768, d_head=64, n_heads=12, d_mlp=3072, d_vocab=1000,
                                  n_ctx=16, act_fn="gelu_new", normalization_type="LN", seed=0)
    model = make_model(cfg).eval()
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 1000, (2, N_POS), generator=g)
    corrupted = clean.clone()
    corrupted[0, 2:] = torch.randint(0, 1000, (N_POS - 2,), generator=g)
    corrupted[1, 1:] = torch.randint(0, 1000, (N_POS - 1,), generator=g)
    answer_pos = torch.tensor([4, 3])
    with torch.no_grad():  # the model's own clean and corrupted favourites: a well-conditioned logit diff
        top_clean = model(clean)[[0, 1], answer_pos].argmax(-1)
        corr = model(corrupted)[[0, 1], answer_pos]
        corr[[0, 1], top_clean] = -torch.inf
        top_corrupted = corr.argmax(-1)
    answers = torch.stack([top_clean, top_corrupted], 1)[:, :, None]
    return model, PromptPairs(clean, corrupted, answer_pos, answers)


def _tl(model, pairs):
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(pairs.clean)
        raw = tl_metric("logit_diff", pairs)
        metric = tl_metric("logit_diff", pairs, raw(clean_logits).item(), raw(model(pairs.corrupted)).item())
    return cache, metric


def test_sweeps_on_a_subset_of_patches(gpt2):
    """Each sweep type's code paths (residual writes, whole heads, head vectors by position, patterns)
    on 3 random patches each plus a last-layer one; every kind in full is the slow test below."""
    model, pairs = gpt2
    ctx = patching_context(model, pairs)
    ctx.prepare([KINDS["resid_pre"]])
    assert ctx.fast and abs(float(ctx.clean_rows.mean() - ctx.corr_rows.mean())) > 0.1
    cache, metric = _tl(model, pairs)
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for kind, setter in SETTERS.items():
        spec = KINDS[kind]
        shape = enumerate_patches(ctx, spec).shape
        flat = torch.randperm(int(torch.tensor(shape).prod()), generator=g)[:4]
        flat[0] = flat[0] % (int(torch.tensor(shape).prod()) // 12) + 11 * (int(torch.tensor(shape).prod()) // 12)
        flat = flat.sort().values  # one patch in the last layer, where only the answer position is computed
        idx = torch.stack(torch.unravel_index(flat, shape), 1)
        ours = run_sweep(ctx, spec, 64 << 20, progress=False, only=flat)
        raw_clean, raw_corr = float(ctx.clean_rows.mean()), float(ctx.corr_rows.mean())
        ours = (ours[tuple(idx.T)] - raw_corr) / (raw_clean - raw_corr)
        df = pd.DataFrame(idx.numpy(), columns=TL_AXES.get(spec.axes, list(spec.axes)))
        with torch.no_grad():
            want = tlp.generic_activation_patch(model, pairs.corrupted, cache, metric, setter, spec.act, index_df=df)
        err = (ours - want).abs().max().item()
        worst = max(worst, err)
        assert err <= 1e-5, f"{kind}: max |ours - TL| = {err:.3g}"
    assert worst > 0.0  # float rounding differs somewhere: the comparison is real


@pytest.mark.slow
@pytest.mark.parametrize("kind", [*KINDS, *EVERY])
def test_every_kind_in_full(gpt2, kind):
    model, pairs = gpt2
    cache, metric = _tl(model, pairs)
    with torch.no_grad():
        if kind in TL_EVERY:
            want = getattr(tlp, TL_EVERY[kind])(model, pairs.corrupted, cache, metric)
        elif kind == "resid_post":
            want = tlp.generic_activation_patch(model, pairs.corrupted, cache, metric, tlp.layer_pos_patch_setter,
                                                "resid_post", ("layer", "pos"))
        else:
            want = getattr(tlp, KINDS[kind].tl_function)(model, pairs.corrupted, cache, metric)
    ours = patch(model, pairs, kind, progress=False).values
    assert (ours - want).abs().max().item() <= 1e-5
