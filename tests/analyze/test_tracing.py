"""Causal tracing: the batched, resumed, chunked sweep equals one ``run_with_hooks`` per restore."""

import json

import pytest
import torch

from toylens.analyze.tracing import TracingError, causal_trace, noise_samples, restore_sweep, rows_for_kind
from toylens.model.build import hooked_config, make_model
from toylens.runs.config import ModelConfig

VOCAB, N_POS = 20, 7


def tiny_model(pos="none", attn_only=False, n_layers=3):
    mc = ModelConfig(n_layers=n_layers, d_model=32, n_heads=2, d_head=16, d_mlp=None if attn_only else 64,
                     act_fn=None if attn_only else "gelu", attn_only=attn_only, positional_embedding_type=pos,
                     init_range=0.3)  # larger weights than the default: peaked, input-sensitive outputs
    return make_model(hooked_config(mc, d_vocab=VOCAB, n_ctx=12, seed=0), pos).eval()


def prompts(b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (b, N_POS), generator=g)
    answer_tokens = torch.randint(0, VOCAB, (b,), generator=g)
    return tokens, answer_tokens


def naive_sweep(model, tokens, answer_pos, answer_tokens, noise, restores, metric):
    """One run_with_hooks per restore set (the noise samples stacked along the batch), full logits."""
    s, b = noise.shape[:2]
    _, cache = model.run_with_cache(tokens)
    rows = torch.arange(s * b)
    out = []
    for restore in restores:
        hooks = [("hook_embed", lambda act, hook: act + noise.reshape(s * b, *noise.shape[2:]))]
        for name, p in restore:
            def put(act, hook, p=p):
                act = act.clone()
                act[:, p] = cache[hook.name][:, p].repeat(s, *[1] * (act.ndim - 2))
                return act
            hooks.append((name, put))
        logits = model.run_with_hooks(tokens.repeat(s, 1), fwd_hooks=hooks)
        logp = logits[rows, answer_pos.repeat(s)].log_softmax(-1)[rows, answer_tokens.repeat(s)]
        out.append((logp.exp() if metric == "prob" else logp).mean())
    return torch.stack(out)


@pytest.mark.parametrize("pos,attn_only,window,metric,budget", [
    ("none", False, 1, "prob", 256.0),
    ("standard", False, 3, "logprob", 0.1),  # a tiny budget: 5-row chunks, 6 rows per restore set
    ("rotary", True, 2, "prob", 256.0),
])
@torch.no_grad()
def test_batched_equals_naive_loop(pos, attn_only, window, metric, budget):
    model = tiny_model(pos, attn_only)
    tokens, answer_tokens = prompts()
    answer_pos = torch.tensor([6, 4, 5])  # per-prompt answer positions; 6 is the last position
    res = causal_trace(model, tokens, answer_pos, answer_tokens, [1, 3], window=window, n_samples=2, seed=5,
                       metric=metric, chunk_budget_mb=budget, progress=False)
    assert set(res.values) == ({"resid", "attn"} if attn_only else {"resid", "attn", "mlp"})
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, [1, 3]] = True
    noise = noise_samples(model, mask, 2, res.sigma, 5)
    ref_noised = naive_sweep(model, tokens, answer_pos, answer_tokens, noise, [[]], metric)[0]
    ref_clean = naive_sweep(model, tokens, answer_pos, answer_tokens, 0 * noise[:1], [[]], metric)[0]
    assert res.noised == pytest.approx(float(ref_noised), abs=1e-5)
    assert res.clean == pytest.approx(float(ref_clean), abs=1e-5)
    assert abs(res.clean - res.noised) > 1e-3  # the noise does something, so parity is not vacuous
    for kind, values in res.values.items():
        labels, groups = rows_for_kind(model, kind, window)
        assert res.row_labels[kind] == labels and values.shape == (len(labels), N_POS)
        restores = [[(h, p) for h in group] for group in groups for p in range(N_POS)]
        ref = naive_sweep(model, tokens, answer_pos, answer_tokens, noise, restores, metric)
        torch.testing.assert_close(values.reshape(-1), ref.float(), atol=1e-5, rtol=0)
        assert (values - res.noised).abs().max() > 1e-3  # some restore moves the metric


def test_rows_follow_rome():
    model = tiny_model()
    labels, groups = rows_for_kind(model, "resid", window=5)  # resid ignores the window, as ROME
    assert labels == ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post",
                      "blocks.2.hook_resid_post"]
    assert groups == [[h] for h in labels]
    _, groups = rows_for_kind(model, "mlp", window=3)  # range(max(0, l - w//2), min(L, l - (-w//2)))
    assert groups == [["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"],
                      ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out", "blocks.2.hook_mlp_out"],
                      ["blocks.1.hook_mlp_out", "blocks.2.hook_mlp_out"]]
    _, groups = rows_for_kind(model, "attn", window=2)
    assert groups == [["blocks.0.hook_attn_out"], ["blocks.0.hook_attn_out", "blocks.1.hook_attn_out"],
                      ["blocks.1.hook_attn_out", "blocks.2.hook_attn_out"]]


@torch.no_grad()
def test_invariants_of_restoring():
    model = tiny_model("standard")
    tokens, answer_tokens = prompts(b=4)
    answer_pos = torch.full((4,), 5)
    res = causal_trace(model, tokens, answer_pos, answer_tokens, [2], n_samples=3, progress=False)
    r, clean, noised = res.values["resid"], res.clean, res.noised
    # the embeddings at the one noised position restored: nothing is noised any more
    assert r[0, 2].item() == pytest.approx(clean, abs=1e-5)
    # the embeddings elsewhere are clean already: restoring them changes nothing
    for p in (0, 1, 3, 4, 5, 6):
        assert r[0, p].item() == pytest.approx(noised, abs=1e-6)
    # the last layer's output at the answer position is what the metric reads
    assert r[-1, 5].item() == pytest.approx(clean, abs=1e-5)
    # before the noise the runs are clean; after the answer position they cannot reach the metric
    for v in res.values.values():
        torch.testing.assert_close(v[:, :2], torch.full_like(v[:, :2], noised), atol=1e-6, rtol=0)
        torch.testing.assert_close(v[:, 6], torch.full_like(v[:, 6], noised), atol=1e-6, rtol=0)
    # several noised positions restored together at the embeddings: the clean run, exactly
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, [1, 2, 4]] = True
    noise = noise_samples(model, mask, 3, 1.0, 0)
    restores = [[("blocks.0.hook_resid_pre", p) for p in (1, 2, 4)], [("blocks.0.hook_resid_pre", p) for p in (1, 2)],
                [("blocks.2.hook_resid_post", 5)], [("blocks.1.attn.hook_z", 4), ("blocks.2.hook_mlp_out", 5)]]
    values, clean2, noised2 = restore_sweep(model, tokens, answer_pos, answer_tokens, noise, restores)
    assert clean2 == pytest.approx(clean, abs=1e-6)
    assert values[0].item() == pytest.approx(clean, abs=1e-5) and values[2].item() == pytest.approx(clean, abs=1e-5)
    assert abs(values[1].item() - clean) > 1e-4  # position 4 still noised
    ref = naive_sweep(model, tokens, answer_pos, answer_tokens, noise, restores[3:], "prob")
    assert values[3].item() == pytest.approx(ref.item(), abs=1e-5)  # any block hook with a pos axis


@torch.no_grad()
def test_noise_is_seeded_and_sigma_defaults_to_three_std_of_w_e():
    model = tiny_model()
    tokens, answer_tokens = prompts()
    answer_pos = torch.full((3,), 6)
    kw = dict(kinds=("resid",), n_samples=2, progress=False)
    a = causal_trace(model, tokens, answer_pos, answer_tokens, [1, 2], seed=3, **kw)
    b = causal_trace(model, tokens, answer_pos, answer_tokens, [1, 2], seed=3, **kw)
    c = causal_trace(model, tokens, answer_pos, answer_tokens, [1, 2], seed=4, **kw)
    assert torch.equal(a.values["resid"], b.values["resid"]) and a.noised == b.noised
    assert a.noised != c.noised
    assert a.sigma == pytest.approx(3 * model.W_E.std().item(), rel=1e-6)
    assert causal_trace(model, tokens, answer_pos, answer_tokens, [1], sigma=0.7, **kw).sigma == 0.7
    mask = torch.zeros(64, 8, dtype=torch.bool)
    mask[:, 3] = True
    z = noise_samples(model, mask, 4, 2.0, 0)
    assert z.shape == (4, 64, 8, 32) and (z[:, :, [0, 1, 2, 4, 5, 6, 7]] == 0).all()
    assert z[:, :, 3].std().item() == pytest.approx(2.0, rel=0.03)


@torch.no_grad()
def test_result_dict_figures_and_mask_input():
    model = tiny_model()
    tokens, answer_tokens = prompts()
    answer_pos = torch.full((3,), 6)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[0, 1] = mask[2, 3] = True
    res = causal_trace(model, tokens, answer_pos, answer_tokens, mask, n_samples=2, progress=False,
                       pos_labels=list("abcdefg"))
    d = json.loads(json.dumps(res.to_dict()))
    assert d["noise_positions"] == [1, 3] and len(d["values"]["mlp"]) == 3 and len(d["values"]["mlp"][0]) == N_POS
    peak = d["peaks"]["resid"]
    assert peak["value"] == pytest.approx(res.values["resid"].max().item())
    assert res.values["resid"][res.row_labels["resid"].index(peak["hook"]), peak["pos"]] == res.values["resid"].max()
    figs = res.figures()
    assert set(figs) == {"tracing/resid", "tracing/attn", "tracing/mlp"}
    heat = figs["tracing/mlp"].data[0]
    assert list(heat.y) == ["a", "b*", "c", "d*", "e", "f", "g"] and list(heat.x) == ["0", "1", "2"]
    assert heat.z[3][1] == pytest.approx(res.values["mlp"][1, 3].item())


@pytest.mark.parametrize("kwargs,field", [
    (dict(noise_positions=[]), "noise_positions"),
    (dict(noise_positions=[9]), "noise_positions"),
    (dict(kinds=("heads",)), "kinds"),
    (dict(window=0), "window"),
    (dict(metric="logit"), "metric"),
    (dict(sigma=-1.0), "sigma"),
    (dict(answer_pos=torch.tensor([7, 0, 0])), "answer_pos"),
    (dict(answer_tokens=torch.tensor([0, VOCAB, 0])), "answer_tokens"),
])
def test_bad_input_names_the_field(kwargs, field):
    model = tiny_model()
    tokens, answer_tokens = prompts()
    args = dict(answer_pos=torch.full((3,), 6), answer_tokens=answer_tokens, noise_positions=[1])
    args.update(kwargs)
    with pytest.raises(TracingError, match=field):
        causal_trace(model, tokens, args.pop("answer_pos"), args.pop("answer_tokens"), args.pop("noise_positions"),
                     progress=False, **args)
    with pytest.raises(TracingError, match="attn_only"):
        causal_trace(tiny_model(attn_only=True), tokens, torch.full((3,), 6), answer_tokens, [1], kinds=("mlp",))


@pytest.mark.parametrize("hook,match", [
    ("blocks.0.attn.hook_pattern", "no pos axis"),
    ("blocks.5.hook_mlp_out", "3 layers"),
    ("blocks.0.hook_nonsense", "not a hook point"),
    ("ln_final.hook_normalized", "inside blocks"),
])
def test_restore_sweep_rejects_hooks_it_cannot_restore(hook, match):
    model = tiny_model()
    tokens, answer_tokens = prompts()
    noise = torch.zeros(1, 3, N_POS, 32)
    with pytest.raises(TracingError, match=match):
        restore_sweep(model, tokens, torch.full((3,), 6), answer_tokens, noise, [[(hook, 1)]])


@pytest.mark.parametrize("name", ["bidirectional", "inverse-layer-scale", "rmspre-gelu_new", "grouped-query",
                                  "logit-softcap", "dmodel-ne-heads"])
@torch.no_grad()
def test_batched_equals_naive_loop_over_the_engine_matrix(name):
    # Bidirectional: positions after the answer and before the first noised one matter; nothing is dropped.
    from toylens.model.zoo import random_model

    model = random_model(name, n_ctx=N_POS, d_vocab=VOCAB).to(torch.float64, print_details=False)
    tokens, answer_tokens = prompts()
    answer_pos = torch.tensor([3, 4, 5])
    res = causal_trace(model, tokens, answer_pos, answer_tokens, [2, 3], n_samples=2, seed=5, metric="logprob",
                       progress=False)
    noise = noise_samples(model, torch.zeros(3, N_POS, dtype=torch.bool).index_fill_(1, torch.tensor([2, 3]), True),
                          2, res.sigma, 5).double()
    for kind in res.values:
        _, groups = rows_for_kind(model, kind)
        restores = [[(h, p) for h in group] for group in groups for p in range(N_POS)]
        ref = naive_sweep(model, tokens, answer_pos, answer_tokens, noise, restores, "logprob")
        torch.testing.assert_close(res.values[kind].flatten().double(), ref, atol=1e-5, rtol=1e-5)
    if name == "bidirectional":  # restoring a position after every answer still moves the metric
        assert (res.values["resid"][1:, N_POS - 1] - res.noised).abs().max() > 1e-4
