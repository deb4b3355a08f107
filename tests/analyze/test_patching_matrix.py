"""Patching sweeps over the engine's config matrix (toylens.model.zoo) against ``transformer_lens.patching``,
including a bidirectional model (no causal truncation) and models the engine refuses (the hook path)."""

import importlib.util
from pathlib import Path

import pytest
import torch
import transformer_lens.patching as tlp

from toylens.analyze.attribution_patching import attribution_patch
from toylens.analyze.patching import KINDS, patch, patching_context
from toylens.model.zoo import MATRIX, random_model

_spec = importlib.util.spec_from_file_location("patching_oracle", Path(__file__).with_name("test_patching.py"))
oracle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(oracle)


@pytest.fixture(autouse=True)
def _quiet_tqdm(monkeypatch):
    monkeypatch.setattr(tlp, "tqdm", lambda items, **kwargs: items)


def small(name):
    """The matrix model at the oracle's prompt size (2 layers, 8 positions, 23 tokens), in float64."""
    return random_model(name, n_layers=2, n_ctx=8, d_vocab=oracle.VOCAB).to(torch.float64, print_details=False)


FULL = ["bidirectional", "inverse-layer-scale", "dmodel-ne-heads", "no-attn-scale", "rmspre-gelu_new", "rotary",
        "attn-only"]
REFUSED = [name for name, (_, _, ok) in MATRIX.items() if not ok]


@pytest.mark.parametrize("name", FULL)
def test_every_kind_equals_transformer_lens_over_the_matrix(name):
    model = small(name)
    pairs = oracle.toy_pairs(model)
    ctx = patching_context(model, pairs)
    assert ctx.fast
    kinds = [k for k in KINDS if not (model.cfg.attn_only and k in ("resid_mid", "mlp_out"))]
    if name != "bidirectional":
        kinds.remove("pattern_dest_src")  # TL's oracle runs a forward per (dest, src)
    oracle.assert_matches_tl(model, pairs, kinds, tol=1e-6)


@pytest.mark.parametrize("name", REFUSED)
def test_refused_models_take_the_hook_path_and_stay_exact(name):
    model = small(name)
    pairs = oracle.toy_pairs(model)
    assert not patching_context(model, pairs).fast
    oracle.assert_matches_tl(model, pairs, ["resid_pre", "attn_out", "z_all_pos", "v_by_pos"], tol=1e-6)


def test_bidirectional_is_not_truncated_at_the_answer():
    # The bug: patching truncated at the answer position as if the model were causal (0.086 off on resid_pre).
    model = small("bidirectional")
    pairs = oracle.toy_pairs(model)
    assert patching_context(model, pairs).T == pairs.n_pos
    ours = patch(model, pairs, "resid_pre", progress=False)
    want = oracle.tl_sweep(model, pairs, "resid_pre")
    late = pairs.answer_pos.min().item() + 1  # positions after some prompt's answer
    assert want[:, late:].abs().max() > 1e-3  # they matter in a bidirectional model
    torch.testing.assert_close(ours.values, want, atol=1e-6, rtol=1e-6)
    for engine in ("hooks", "auto"):
        torch.testing.assert_close(patch(model, pairs, "z_by_pos", engine=engine, progress=False).values,
                                   oracle.tl_sweep(model, pairs, "z_by_pos"), atol=1e-6, rtol=1e-6)


def test_attribution_patching_clean_value_on_a_bidirectional_model():
    model = small("bidirectional")
    pairs = oracle.toy_pairs(model)
    result = attribution_patch(model, pairs, ["resid_pre"], normalize=False)
    with torch.no_grad():
        rows = torch.arange(pairs.batch_size)
        clean = model(pairs.clean)[rows, pairs.answer_pos]
    from toylens.analyze.metrics import get_metric

    want = get_metric("logit_diff")(clean, pairs).mean().item()
    assert result.clean_value == pytest.approx(want, abs=1e-9)
