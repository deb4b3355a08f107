"""The LLC (devinterp's SGLD estimator through ``toylens.analyze.llc``) on potentials whose learning coefficient is
known, its reproducibility, and the chain-health check."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("devinterp")

from toylens.analyze.learning_coefficient import LLCConfig, chain_health, llc  # noqa: E402

D = 10  # parameters


class Potential(torch.nn.Module):
    """A model whose loss is a fixed function of its ``D`` weights, at its minimum w* = 0 (the data are ignored)."""

    def __init__(self, power: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(D))
        self.power = power

    def loss(self) -> torch.Tensor:
        return (self.w ** self.power).sum() / self.power


def _data():
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [[0, 0]] * 64}).with_format("torch")


def _loss_fn(model, input_ids):
    return model.loss().expand(len(input_ids), input_ids.shape[1] - 1)


# n·β = 1000 with a weak pull (γ = 1 << n·β): the tempered posterior of the quadratic is the Gaussian of variance
# 1/(n·β) per weight, so n·β E[L] = D/2; ε n·β = 0.2 keeps Euler's bias (+5% variance) inside the tolerance.
SETTINGS = LLCConfig(lr=2e-4, n_beta=1000.0, localization=1.0, num_chains=4, num_draws=400, batch_size=8, seed=3)
TOL = 0.2  # relative, for the regular model's lambda = d/2


def _llc(power: int, **kw):
    return llc(Potential(power), None, SETTINGS, dataset=_data(), loss_fn=_loss_fn, device="cpu", **kw)


def test_regular_quadratic_reads_d_over_2_and_degenerate_reads_less():
    reg = _llc(2)
    assert reg.llc_mean == pytest.approx(D / 2, rel=TOL)
    assert reg.health["ok"], reg.health
    # w^4 per weight: lambda = 1/4 each, D/4 = 2.5 in all; measured 1.74 (the flat potential mixes slowly from w* = 0
    # in 400 draws, so it reads low), well below the regular D/2
    deg = _llc(4)
    assert deg.llc_mean < 0.75 * reg.llc_mean
    assert reg.loss_trace.shape == (4, 400) and len(reg.llc_per_chain) == 4


def test_same_seed_same_estimate():
    a, b = _llc(2, num_draws=50), _llc(2, num_draws=50)
    assert a.llc_mean == b.llc_mean and torch.equal(a.loss_trace, b.loss_trace)
    c = _llc(2, num_draws=50, seed=4)
    assert c.llc_mean != a.llc_mean


def test_huge_step_size_fires_the_health_check():
    bad = _llc(2, lr=0.01, num_draws=50)  # ε n·β h = 10 > 2: Euler's map is unstable and the chain blows up
    assert not bad.health["ok"]
    w = bad.health["warnings"][0]
    assert w["check"] == "diverged" and w["key"] == "llc.lr" and "lower llc.lr" in w["text"]


def test_chain_health_rules():
    flat = torch.full((2, 40), 1.0, dtype=torch.float64)
    h = chain_health(flat, 1.0, [0.01, 0.01])
    assert h["warnings"][0]["check"] == "flat" and "raise llc.lr" in h["warnings"][0]["text"]
    ok = 1.1 + 0.01 * torch.randn(2, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert chain_health(ok, 1.0, [0.01, 0.01])["ok"]
    assert chain_health(ok, 1.0, [0.9, 0.01])["warnings"][0]["check"] == "step_size"
    rising = torch.linspace(1.0, 2.0, 40, dtype=torch.float64).expand(2, 40)
    assert [w["check"] for w in chain_health(rising, 1.0, [0.01])["warnings"]] == ["drifting"]
    assert chain_health(ok - 0.5, 1.0, [0.01])["warnings"][0]["check"] == "negative"


def test_task_llc_on_a_tiny_transformer_and_per_head_masks():
    from toylens._compat import HookedTransformerConfig
    from toylens.analyze.learning_coefficient import component_masks
    from toylens.data import TASKS, make_task
    from toylens.model.build import make_model

    task = make_task(TASKS["induction"].config_cls(n_symbols=8, half_len=4, pad=2))
    cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_vocab=task.d_vocab,
                                  n_ctx=task.seq_len, attn_only=True, normalization_type=None, seed=0)
    model = make_model(cfg, positional_embedding_type="standard")
    small = LLCConfig(num_chains=2, num_draws=8, n_rows=64, batch_size=16)
    whole = llc(model, task, small)
    assert whole.loss_trace.shape == (2, 8) and torch.isfinite(whole.loss_trace).all()
    assert whole.init_loss == pytest.approx(float(_task_loss(model, task, 64, 0)), rel=1e-4)
    masks = component_masks(model)
    assert set(masks) == {"L0H0", "L0H1", "L1H0", "L1H1"}
    head = llc(model, task, small, param_masks=masks["L0H1"])
    assert head.n_params == 4 * 16 * 8 + 3 * 8  # W_Q, W_K, W_V, W_O rows of one head and its b_Q, b_K, b_V
    assert math.isfinite(head.llc_mean) and head.n_params < whole.n_params


def _task_loss(model, task, n_rows, seed):
    import torch.nn.functional as F

    b = task.sample(n_rows, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits = model(b.tokens)
    nll = F.cross_entropy(logits.flatten(0, 1), b.targets.flatten(), reduction="none").reshape(b.tokens.shape)
    return (nll * b.loss_mask).sum() / b.loss_mask.sum()


def test_over_checkpoints_equals_each_checkpoint(tmp_path, tiny_run):
    from toylens.analyze.learning_coefficient import llc_over_checkpoints
    from toylens.data import TASKS
    from toylens.runs.config import ModelConfig
    from toylens.runs.run import load_run

    run = load_run(tiny_run(tmp_path / "run", **{
        "task": TASKS["induction"].config_cls(n_symbols=8, half_len=4, pad=2),
        "model": ModelConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=None, attn_only=True,
                             positional_embedding_type="standard")}))
    small = LLCConfig(num_chains=2, num_draws=8, n_rows=64, batch_size=16)
    res = llc_over_checkpoints(run, cfg=small, progress=False)
    assert res.steps == run.steps and res.loss_trace.shape == (len(run.steps), 2, 8)
    one = llc(run.model(run.steps[0]), run.task, small)
    assert float(res.llc_mean[0]) == pytest.approx(one.llc_mean, rel=1e-5)
    ds = res.to_xarray()
    assert ds["loss_trace"].dims == ("step", "chain", "draw") and list(ds["step"].values) == run.steps
    assert "llc/curve" in res.figures()


def test_drift_to_noise_ratio_matches_the_quadratics_stationary_chain():
    # SGLD on L = |w|²/2 with step ε and inverse temperature n·β (γ small) is the AR(1) map w' = (1 - a) w + √ε ξ,
    # a = ε n·β / 2, whose stationary variance per weight is ε / (1 - (1 - a)²) = 1 / (n·β (1 - a/2)). Then
    # |ε/2 n·β ∇L| / |√ε ξ| = (ε/2) n·β |w| / √(ε D) -> √(ε n·β) / (2 √(1 - ε n·β / 4)).
    for lr, fires in ((2e-4, False), (1.5e-3, True)):
        r = _llc(2, lr=lr, num_draws=200)
        x = lr * SETTINGS.n_beta
        want = math.sqrt(x) / (2 * math.sqrt(1 - x / 4))
        assert sum(r.drift_ratio) / len(r.drift_ratio) == pytest.approx(want, rel=0.12), (lr, r.drift_ratio)
        assert any(w["check"] == "step_size" and w["key"] == "llc.lr" for w in r.health["warnings"]) == fires


def test_lr_none_takes_the_largest_healthy_step_of_the_ladder():
    # n·β = 1e5 on the quadratic: ε n·β = 10 (1e-4) blows up; 3 and 1 (3e-5, 1e-5) are stable but their drift is
    # 1.7x and 0.58x their noise (see the test above); 0.3 (3e-6) is healthy: 0.28x.
    r = _llc(2, lr=None, n_beta=1e5, num_chains=2, num_draws=100)
    pilots = r.settings["lr_pilots"]
    assert [(p["lr"], p["ok"]) for p in pilots] == [(1e-4, False), (3e-5, False), (1e-5, False), (3e-6, True)]
    assert pilots[0]["checks"] == ["diverged"] and pilots[1]["checks"] == pilots[2]["checks"] == ["step_size"]
    assert r.settings["lr"] == 3e-6 and r.settings["num_draws"] == 100 and r.health["ok"], r.health
    given = _llc(2, num_draws=50)  # a given lr: no pilots
    assert "lr_pilots" not in given.settings and given.settings["lr"] == SETTINGS.lr


def test_auto_draws_hold_the_sgld_time_in_whole_epochs():
    from toylens.analyze.learning_coefficient import auto_draws

    assert auto_draws(1e-4, 512, 32) == 64  # 64 draws = 4 epochs of 16 batches
    assert auto_draws(3e-5, 512, 32) == 224  # 6.4e-3 / 3e-5 = 213.3 -> 14 epochs
    assert auto_draws(1e-3, 512, 32) == 64  # never fewer than 64
    assert auto_draws(1e-4, 100, 32) == 66  # 3 batches an epoch
