"""The induction and fourier report sections and their over=checkpoints curves: each number in
report.json equals the analysis run directly, and a run whose task does not fit gets the reason."""

from __future__ import annotations

import pytest

from toylens.analyze.canon_dynamics import locate_phases, steepest_rise
from toylens.data import TASKS
from toylens.report.build import build_report
from toylens.report.config import AnalyzeConfig
from toylens.runs.config import ModelConfig
from toylens.runs.run import load_run


def cfg_for(run_dir, **kw) -> AnalyzeConfig:
    cfg = AnalyzeConfig(run=str(run_dir), device="cpu", progress=False, chunk_size=50,
                        analyses=["fold", "induction", "fourier"], **kw)
    cfg.batch.size = 64
    cfg.dynamics.analyses = []
    return cfg


@pytest.fixture(scope="module")
def induction_run(tmp_path_factory, tiny_run):
    return tiny_run(tmp_path_factory.mktemp("ind") / "run", **{
        "task": TASKS["induction"].config_cls(n_symbols=12, half_len=5, pad=4),
        "model": ModelConfig(n_layers=2, d_model=32, n_heads=2, d_head=16, d_mlp=None, attn_only=True,
                             positional_embedding_type="standard")})


@pytest.fixture(scope="module")
def modular_run(tmp_path_factory, tiny_run):
    return tiny_run(tmp_path_factory.mktemp("mod") / "run", **{
        "task": TASKS["modular_add"].config_cls(p=11, frac_train=0.4, split_seed=2),
        "model": ModelConfig(n_layers=1, d_model=32, n_heads=2, d_head=16, d_mlp=40, act_fn="relu",
                             normalization_type=None, positional_embedding_type="standard")})


def test_induction_section_equals_the_analysis(induction_run):
    from toylens.analyze.induction import induction_circuit, repeat_spec
    from toylens.model.fold import fold

    run = load_run(induction_run)
    cfg = cfg_for(induction_run, over="checkpoints")
    report = build_report(run, cfg)
    d = report.data["induction"]
    model = run.model()
    spec, _ = repeat_spec(run.task, model.cfg.n_ctx)
    assert spec.half_len == 5 and d["sequences"]["half_len"] == 5
    folded = fold(model, run.batch(256), tol=float("inf")).model
    res = induction_circuit(model, spec, n_rows=64, seed=cfg.batch.seed, folded=folded)
    assert d["icl_score"] == pytest.approx(res.icl_score, abs=1e-5)
    for h, scores in d["scores_by_head"].items():
        layer, head = int(h[1]), int(h[3])
        assert scores["induction"] == pytest.approx(float(res.scores["induction"][layer, head]), abs=1e-5)
        assert scores["copying"] == pytest.approx(float(res.copying[layer, head]), abs=1e-4)
    assert d["circuit"]["line"] == res.circuit["line"]
    for h in d["circuit"]["previous_token_heads"] + d["circuit"]["induction_heads"]:
        assert h["head"] in d["circuit"]["line"]  # every carrier is named in the line
    assert set(d["task_scores_by_head"]) == set(d["scores_by_head"])
    cp = d["composition_patching"]
    assert "skipped" in cp or {"K", "Q", "V", "relies_on"} <= set(cp)
    assert report.data["errors"] == []
    left = {x["analysis"]: x["reason"] for x in report.data["left_out"]}
    assert "modular_add" in left["fourier"] and "fourier" not in report.data
    dyn = report.data["dynamics_canon"]["induction"]  # min(batch.size, 500) rows, the same seed
    assert dyn["steps"] == run.steps
    layer1 = [s["induction"] for h, s in d["scores_by_head"].items() if h.startswith("L1")]
    assert dyn["best_induction_score"][-1] == pytest.approx(max(layer1), abs=1e-5)


def test_fourier_section_equals_the_analysis(modular_run):
    from toylens.analyze.fourier import fourier_analysis

    run = load_run(modular_run)
    report = build_report(run, cfg_for(modular_run, over="checkpoints"))
    d = report.data["fourier"]
    res = fourier_analysis(run.model(), run.task)
    assert d["key_freqs"] == res.key_freqs
    for kind in ("loss", "restricted", "excluded"):
        for split in ("train", "test"):
            assert d["losses"][kind][split] == pytest.approx(res.losses[kind][split], rel=1e-5)
    assert report.data["errors"] == []
    left = {x["analysis"]: x["reason"] for x in report.data["left_out"]}
    assert "repeated" in left["induction"] and "induction" not in report.data
    g = report.data["dynamics_canon"]["grokking"]
    assert g["steps"] == run.steps
    assert g["losses"]["loss/test"][-1] == pytest.approx(res.losses["loss"]["test"], rel=1e-5)


def test_phase_rules():
    steps = list(range(0, 1000, 100))
    train_acc = [0.1, 0.6, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    test_loss = [4.0, 5.0, 6.0, 6.0, 5.9, 5.0, 0.5, 0.01, 0.005, 0.005]
    ph = locate_phases(steps, train_acc, test_loss)
    # log test loss peaks at log 6 (step 200) and bottoms at log 0.005: 10% of that fall is loss 2.95
    # (first reached at step 600), 90% is loss 0.0102 (step 700)
    assert ph["memorisation"] == [0, 200] and ph["circuit_formation"] == [200, 600] and ph["cleanup"] == [600, 700]
    ph = locate_phases(steps, train_acc, [4.0] * 10)
    assert ph["cleanup"] is None and "no grokking" in ph["note"]
    assert locate_phases(steps, [0.5] * 10, test_loss)["memorisation"] is None
    pc = steepest_rise([0, 10, 20, 40], [0.0, 0.1, 0.2, 0.9])
    assert (pc["from_step"], pc["to_step"]) == (20, 40) and pc["rise"] == pytest.approx(0.7)
    assert steepest_rise([0, 10], [0.5, 0.4]) is None
