import json

import pytest
import torch

from toylens._compat import HookedTransformerConfig
from toylens.analyze.neurons import GELU_LIKE_THRESHOLD, neuron_activity
from toylens.data.base import Batch
from toylens.model.build import make_model

N_CTX, D_MLP = 10, 32


def tiny_model(act_fn="relu", attn_only=False, seed=0):
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, n_heads=2, d_head=8, d_vocab=20, n_ctx=N_CTX, normalization_type="LN",
        attn_only=attn_only, seed=seed, **({} if attn_only else dict(d_mlp=D_MLP, act_fn=act_fn)))
    return make_model(cfg, positional_embedding_type="none")


def random_tokens(n=7, seed=0):
    return torch.randint(0, 20, (n, N_CTX), generator=torch.Generator().manual_seed(seed))


def reference_posts(model, tokens):
    """hook_post of every layer, caught by a plain loop of run_with_hooks (one layer per run)."""
    posts = []
    for layer in range(model.cfg.n_layers):
        caught = []

        def catch(act, hook, caught=caught):
            caught.append(act.detach())

        model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.mlp.hook_post", catch)])
        posts.append(caught[0])
    return posts


@pytest.mark.parametrize("act_fn,threshold", [("relu", 0.0), ("gelu", GELU_LIKE_THRESHOLD)])
def test_frequency_and_mean_equal_a_per_hook_loop(act_fn, threshold):
    model, tokens = tiny_model(act_fn), random_tokens()
    res = neuron_activity(model, tokens, chunk_size=3)
    assert res.threshold == threshold and res.layers == [0, 1]
    assert res.frequency.shape == res.mean_activation.shape == (2, N_CTX, D_MLP)
    for layer, post in enumerate(reference_posts(model, tokens)):
        assert torch.allclose(res.frequency[layer], (post > threshold).float().mean(0), atol=1e-6)
        assert torch.allclose(res.mean_activation[layer], post.mean(0), atol=1e-5)
        assert torch.equal(res.dead[layer], ~(post > threshold).any(0).any(0))


def test_planted_dead_neuron_and_custom_threshold():
    model = tiny_model("relu", seed=1)
    with torch.no_grad():
        model.blocks[1].mlp.b_in[5] = -1e4  # pre-activation hugely negative: never fires
    res = neuron_activity(model, random_tokens())
    assert res.dead[1, 5] and res.n_dead[1] >= 1
    assert res.frequency[1, :, 5].max() == 0
    strict = neuron_activity(model, random_tokens(), threshold=1e9)
    assert strict.threshold == 1e9 and strict.n_dead == [D_MLP, D_MLP]


def test_attn_only_model_gives_an_empty_result():
    res = neuron_activity(tiny_model(attn_only=True), random_tokens(3))
    assert res.layers == [] and res.n_dead == [] and res.frequency.numel() == 0
    assert res.figures() == {}
    json.dumps(res.to_dict())


def test_figures_and_to_dict():
    tokens = random_tokens()
    res = neuron_activity(tiny_model(), Batch(tokens, tokens, torch.ones(7, N_CTX, dtype=torch.bool)))
    d = res.to_dict()
    json.dumps(d)
    assert set(d["dead_neurons"]) == {"blocks.0.mlp", "blocks.1.mlp"}
    figs = res.figures()
    assert {"neurons/layer0_frequency", "neurons/layer1_mean_activation", "neurons/dead"} <= set(figs)
