import csv
import json
import math

import pytest
import torch

import toylens.analyze.ablation.plan as plan
from toylens._compat import HookedTransformerConfig
from toylens.analyze.ablation import AblationResult, ablate_every_hook
from toylens.analyze.ablation.plan import HEAD_LABEL
from toylens.data import TASKS, make_task
from toylens.data.base import Batch
from toylens.model.build import make_model

D_VOCAB, N_CTX = 23, 9


def tiny_model(norm="LN", pos="standard", n_heads=2, attn_only=False, seed=0, **extra):
    kwargs = dict(n_layers=2, d_model=16, n_heads=n_heads, d_head=8, d_vocab=D_VOCAB, n_ctx=N_CTX,
                  normalization_type=norm, attn_only=attn_only, seed=seed, **extra)
    if not attn_only:
        kwargs.update(d_mlp=32, act_fn="relu")
    if pos == "rotary":
        kwargs.update(positional_embedding_type="rotary", rotary_dim=8)
    pos_type = "none" if pos == "none" else "standard"
    model = make_model(HookedTransformerConfig(**kwargs), positional_embedding_type=pos_type)
    # Larger-than-init weights and non-trivial LN parameters so that every ablation moves the loss.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_((0.5 if "ln" in name or ".b_" in name else 0.3) * torch.randn(p.shape, generator=gen))
    return model


def prev_token_batch(n, seed, d_vocab=D_VOCAB, seq_len=N_CTX):
    task = make_task(TASKS["prev_token"].config_cls(d_vocab=d_vocab, seq_len=seq_len))
    return task.sample(n, torch.Generator().manual_seed(seed))


def sparse_mask_batch(n, seed):
    """Loss at a few scattered positions (not a contiguous range) and targets unrelated to tokens."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, D_VOCAB, (n, N_CTX), generator=gen)
    targets = torch.randint(0, D_VOCAB, (n, N_CTX), generator=gen)
    mask = torch.zeros(n, N_CTX, dtype=torch.bool)
    mask[:, [2, 5, 6]] = True
    mask[0, 8] = True
    return Batch(tokens, targets, mask)


# --- the oracle: seed 004's loop, one run_with_hooks per hook on the whole batch -----------------
def masked_loss_acc(logits, batch):
    logp = logits.log_softmax(-1).gather(-1, batch.targets[..., None])[..., 0]
    loss = -logp[batch.loss_mask].mean().item()
    acc = (logits.argmax(-1) == batch.targets)[batch.loss_mask].float().mean().item()
    return loss, acc


def naive_ablation(model, batch, reference, mode, labels, resample_index=None):
    with torch.inference_mode():
        _, cache = model.run_with_cache(reference.tokens)
        out = {}
        n = len(batch)
        for label in labels:
            m = HEAD_LABEL.fullmatch(label)
            hook, head = (f"blocks.{m['layer']}.attn.hook_z", int(m["head"])) if m else (label, None)
            ref = cache[hook]
            if mode == "mean":
                new = ref.mean(0).expand(n, *ref.shape[1:])
            elif mode == "zero":
                new = torch.zeros(n, *ref.shape[1:], dtype=ref.dtype)
            else:
                new = ref[resample_index]

            def replace(activation, hook, new=new, head=head):
                if head is None:
                    return new.clone()
                activation = activation.clone()
                activation[:, :, head] = new[:, :, head]
                return activation

            logits = model.run_with_hooks(batch.tokens, fwd_hooks=[(hook, replace)])
            out[label] = masked_loss_acc(logits, batch)
        return masked_loss_acc(model(batch.tokens), batch), out


def assert_matches_naive(res: AblationResult, model, batch, reference, resample_index=None, tol=1e-4):
    clean, _ = naive_ablation(model, batch, reference, "zero", [])
    assert res.clean_loss == pytest.approx(clean[0], abs=tol)
    assert res.clean_accuracy == pytest.approx(clean[1], abs=1e-6)
    for mode in res.modes:
        _, expect = naive_ablation(model, batch, reference, mode, res.hooks, resample_index)
        for label, (loss, acc) in expect.items():
            row = res.row(label, mode)
            if math.isnan(loss):
                assert math.isnan(row.loss), (label, mode)
                continue
            assert row.loss == pytest.approx(loss, abs=tol), (label, mode, row.loss, loss)
            assert row.delta_loss == pytest.approx(row.loss - res.clean_loss, abs=1e-12)
            # an argmax may flip on a float-level tie, nothing more
            assert row.accuracy == pytest.approx(acc, abs=1.5 / batch.loss_mask.sum().item()), (label, mode)


VARIANTS = {
    "seed_like": dict(norm="LN", pos="none", n_heads=1),
    "ln_2heads_standard": dict(norm="LN", pos="standard", n_heads=2),
    "attn_only_2heads_none": dict(norm="LN", pos="none", n_heads=2, attn_only=True),
    "rms_attn_result": dict(norm="RMS", pos="standard", n_heads=2, use_attn_result=True),
    "no_norm_rotary": dict(norm=None, pos="rotary", n_heads=2),
    "lnpre_standard": dict(norm="LNPre", pos="standard", n_heads=2),
    "no_norm_none": dict(norm=None, pos="none", n_heads=3),
}
# Variants the fused engine covers; the others run through the model's hooks.
FUSED = {"seed_like", "ln_2heads_standard", "attn_only_2heads_none", "lnpre_standard", "no_norm_none", "no_norm_rotary"}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_naive_loop_every_mode_hook_and_head(variant):
    model = tiny_model(**VARIANTS[variant])
    batch, reference = prev_token_batch(23, seed=1), prev_token_batch(31, seed=2)
    gen_seed = 5
    res = ablate_every_hook(model, batch, reference=reference, modes=("mean", "zero", "resample"),
                            chunk_rows=7, generator=torch.Generator().manual_seed(gen_seed), progress=False)
    index = plan.resample_rows(len(batch), len(reference), False, torch.Generator().manual_seed(gen_seed))
    assert_matches_naive(res, model, batch, reference, index)
    assert (res.engine == "fused") == (variant in FUSED), res.engine
    if model.cfg.n_heads > 1:
        assert {"L0H0", "L0H1", "L1H0", "L1H1"} <= set(res.hooks)


def test_matches_naive_on_the_batch_itself_with_a_sparse_loss_mask():
    model = tiny_model(norm="LN", pos="standard", n_heads=2)
    batch = sparse_mask_batch(19, seed=3)
    res = ablate_every_hook(model, batch, modes=("mean", "resample"), chunk_rows=6,
                            generator=torch.Generator().manual_seed(0), progress=False)
    index = plan.resample_rows(len(batch), len(batch), True, torch.Generator().manual_seed(0))
    assert not (index == torch.arange(len(batch))).any()  # resample: always another row
    assert_matches_naive(res, model, batch, batch, index)


def test_generic_path_matches_naive_too(monkeypatch):
    # Architectures outside the fast path get the plain resumed loop; it must be exact as well.
    import toylens.analyze.ablation as ablation

    monkeypatch.setattr(plan, "one_row_tricks_ok", lambda model, why: False)
    monkeypatch.setattr(ablation, "fast_path_reason", lambda model: "forced by the test")
    model = tiny_model(norm="LN", pos="none", n_heads=2)
    batch, reference = prev_token_batch(17, seed=4), prev_token_batch(20, seed=5)
    res = ablate_every_hook(model, batch, reference=reference, modes=("mean", "zero"), chunk_rows=5,
                            progress=False)
    assert_matches_naive(res, model, batch, reference)
    assert res.engine == "hooked (forced by the test)"


def test_seed_hook_list_and_nothing_skipped_silently():
    model = tiny_model(norm="LN", pos="none", n_heads=1)
    res = ablate_every_hook(model, prev_token_batch(8, seed=0), progress=False)
    assert len(res.hooks) == 39  # the seed setting: every hook that fires except hook_pos_embed
    assert "hook_pos_embed" not in res.hooks and "hook_embed" in res.hooks
    assert {"ln_final.hook_scale", "unembed.hook_out", "blocks.1.attn.hook_attn_scores"} <= set(res.hooks)
    reasons = {s.hook: s.reason for s in res.skipped}
    assert "none" in reasons["hook_pos_embed"]
    assert "use_attn_result" in reasons["blocks.0.attn.hook_result"]
    assert "n_heads == 1" in reasons["L1H0"]
    # every hook point of the model is either ablated or listed with a reason
    assert set(model.hook_dict) <= set(res.hooks) | set(reasons)
    assert len(res.rows) == 39


def test_standard_positions_keep_hook_pos_embed_and_heads_can_be_switched_off():
    model = tiny_model(norm="LN", pos="standard", n_heads=2)
    batch = prev_token_batch(6, seed=0)
    res = ablate_every_hook(model, batch, per_head=False, progress=False)
    assert "hook_pos_embed" in res.hooks
    assert res.row("hook_pos_embed").delta_loss == pytest.approx(0.0, abs=1e-6)  # mean of identical rows
    assert not any(HEAD_LABEL.fullmatch(h) for h in res.hooks)
    assert {s.reason for s in res.skipped if s.hook == "L0H1"} == {"per_head=False"}


def test_hooks_subset_and_invalid_names():
    model = tiny_model(norm="LN", pos="none", n_heads=2)
    batch = prev_token_batch(10, seed=0)
    res = ablate_every_hook(model, batch, hooks=["blocks.1.mlp.hook_post", "L0H1", "hook_embed"],
                            modes=("mean", "zero"), progress=False)
    assert res.hooks == ["hook_embed", "L0H1", "blocks.1.mlp.hook_post"]  # forward order
    assert len(res.rows) == 6
    assert any(s.hook == "blocks.0.hook_resid_pre" and "not selected" in s.reason for s in res.skipped)
    with pytest.raises(ValueError, match="cannot ablate"):
        ablate_every_hook(model, batch, hooks=["blocks.0.attn.hook_result"], progress=False)
    with pytest.raises(ValueError, match="cannot ablate"):
        ablate_every_hook(model, batch, hooks=["L0H7"], progress=False)
    with pytest.raises(ValueError, match="unknown ablation modes"):
        ablate_every_hook(model, batch, modes=("median",), progress=False)


def test_distinct_hooks_with_equal_values_and_chunking_invariance():
    model = tiny_model(norm="LN", pos="none", n_heads=2)
    batch, reference = prev_token_batch(21, seed=7), prev_token_batch(13, seed=8)
    a = ablate_every_hook(model, batch, reference=reference, chunk_rows=4, progress=False)
    b = ablate_every_hook(model, batch, reference=reference, chunk_rows=1000, progress=False)
    for r in a.rows:
        assert b.row(r.hook).loss == pytest.approx(r.loss, abs=1e-5)
    # resid_post of block 0 and resid_pre of block 1 are distinct hooks holding the same value
    assert a.row("blocks.0.hook_resid_post").loss == pytest.approx(a.row("blocks.1.hook_resid_pre").loss,
                                                                   abs=1e-5)


def test_resample_is_reproducible_and_depends_on_the_generator():
    model = tiny_model(norm="LN", pos="none", n_heads=2)
    batch = prev_token_batch(12, seed=0)
    runs = [ablate_every_hook(model, batch, modes=("resample",), hooks=["blocks.0.hook_attn_out"],
                              generator=torch.Generator().manual_seed(s), progress=False) for s in (1, 1, 2)]
    assert runs[0].rows[0].loss == runs[1].rows[0].loss
    assert runs[0].rows[0].loss != runs[2].rows[0].loss


def test_result_ranking_dict_csv_and_figures(tmp_path):
    model = tiny_model(norm="LN", pos="none", n_heads=2)
    res = ablate_every_hook(model, prev_token_batch(9, seed=0), modes=("mean", "zero"), progress=False)
    deltas = [r.delta_loss for r in res.rows]
    finite = [d for d in deltas if not math.isnan(d)]
    assert finite == sorted(finite, reverse=True)
    assert all(math.isnan(d) for d in deltas[: len(deltas) - len(finite)])  # NaN (broken model) first
    d = res.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["clean_loss"] == pytest.approx(res.clean_loss)
    assert set(d["rows"][0]) == {"hook", "mode", "loss", "delta_loss", "accuracy"}
    path = res.to_csv(tmp_path / "report" / "ablation.csv")
    with open(path) as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == len(res.rows)
    assert lines[0]["hook"] == res.rows[0].hook and float(lines[-1]["loss"]) == pytest.approx(res.rows[-1].loss)
    fig = res.figures()["ablation/delta_loss"]
    assert [t.name for t in fig.data] == ["mean", "zero"]
    assert list(fig.data[0].x) == res.hooks


def test_worker_threads_do_not_change_results():
    model = tiny_model(norm="LN", pos="none", n_heads=2)
    batch, reference = prev_token_batch(30, seed=11), prev_token_batch(25, seed=12)
    kw = dict(reference=reference, modes=("mean", "resample"), chunk_rows=8, progress=False,
              generator=torch.Generator().manual_seed(3))
    one = ablate_every_hook(model, batch, workers=1, **kw)
    kw["generator"] = torch.Generator().manual_seed(3)
    three = ablate_every_hook(model, batch, workers=3, **kw)
    assert three.clean_loss == pytest.approx(one.clean_loss, abs=1e-6)
    for r in one.rows:
        assert three.row(r.hook, r.mode).loss == pytest.approx(r.loss, abs=1e-6)
    assert torch.get_num_threads() >= 1 and not model.hook_dict["hook_embed"].fwd_hooks  # all restored


def test_argmax_is_matches_argmax_with_ties_and_nans():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, 7, generator=gen)
    logits[0, 0] = 1.0  # all tied: argmax picks index 0
    logits[1, 1, 2] = logits[1, 1, 5] = 9.0  # two tied maxima
    logits[2, 2, 3] = float("nan")
    targets = torch.randint(0, 7, (6, 5), generator=gen)
    targets[0, 0], targets[1, 1] = 3, 5
    before = logits.clone()
    got = plan.argmax_is(logits, targets.unsqueeze(-1))
    assert torch.equal(got, logits.argmax(-1) == targets)
    assert torch.equal(torch.nan_to_num(logits, nan=0.5), torch.nan_to_num(before, nan=0.5))  # restored
    clean = torch.randn(6, 5, 7, generator=gen)
    assert torch.equal(plan.argmax_is(clean, targets.unsqueeze(-1)), clean.argmax(-1) == targets)
