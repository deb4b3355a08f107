"""Training dynamics (``over=checkpoints``): every number equals the single-checkpoint analysis run
on that checkpoint by itself, and the report/CLI carry them."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from toylens.analyze.ablation import ablate_every_hook
from toylens.analyze.attention import SCORE_NAMES, attention_patterns
from toylens.analyze.dynamics import DynamicsResult, checkpoint_dynamics
from toylens.analyze.qkov import circuits
from toylens.model.fold import fold
from toylens.report import cli
from toylens.report.build import make_report
from toylens.report.config import AnalyzeConfig
from toylens.runs.config import ConfigError
from toylens.runs.run import RunError, load_run


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_run):
    d = tiny_run(tmp_path_factory.mktemp("runs") / "tiny", **{"train.checkpoint_every": 5, "train.steps": 20})
    return load_run(d)


def test_dynamics_equal_the_single_checkpoint_analyses(run):
    batch, ref = run.batch(48), run.batch(32, seed=7)
    dyn = checkpoint_dynamics(run, batch, reference=ref, chunk_size=16, ablation_chunk_rows=16, progress=False)
    assert dyn.steps == run.steps == [5, 10, 15, 20]
    for i, step in enumerate(dyn.steps):
        model = run.model(step)
        # eval loss and accuracy: one plain forward over the whole batch
        with torch.no_grad():
            logits = model(batch.tokens)
        loss = F.cross_entropy(logits[batch.loss_mask], batch.targets[batch.loss_mask])
        assert float(dyn.loss[i]) == pytest.approx(float(loss), rel=1e-5)
        assert float(dyn.accuracy[i]) == pytest.approx(float(run.task.accuracy(logits, batch)), abs=1e-6)
        att = attention_patterns(model, batch)
        for name in SCORE_NAMES:
            torch.testing.assert_close(dyn.head_scores[name][i], att.scores[name], equal_nan=True)
        circ = circuits(fold(model, batch).model)
        torch.testing.assert_close(dyn.copying_score[i], circ.copying_score, rtol=1e-5, atol=1e-6)
        abl = ablate_every_hook(model, batch, reference=ref, modes=["mean"], progress=False)
        assert dyn.ablation_hooks == abl.hooks
        want = torch.tensor([abl.row(h, "mean").delta_loss for h in abl.hooks])
        torch.testing.assert_close(dyn.ablation_delta_loss[i], want, rtol=1e-5, atol=1e-6)
    # the checkpoints differ: the dynamics are not one checkpoint repeated
    assert float(dyn.loss[0]) > float(dyn.loss[-1])
    assert not torch.equal(dyn.head_scores["previous_token"][0], dyn.head_scores["previous_token"][-1])
    assert dyn.ablation_delta_loss.shape == (4, len(dyn.ablation_hooks))


def test_subset_of_steps_and_bad_input(run):
    dyn = checkpoint_dynamics(run, run.batch(16), steps=[20, 10], analyses=["attention"], progress=False)
    assert dyn.steps == [10, 20] and dyn.copying_score is None and dyn.ablation_delta_loss is None
    with pytest.raises(ValueError, match="'logit_lens' is not a dynamics analysis"):
        checkpoint_dynamics(run, run.batch(16), analyses=["logit_lens"])
    with pytest.raises(RunError, match="step=7"):
        checkpoint_dynamics(run, run.batch(16), steps=[7])


def test_formed_at_is_when_the_most_rising_head_made_half_its_rise():
    prev = torch.tensor([[[0.0, 0.25]], [[0.25, 0.5]], [[0.5, 0.5]], [[1.0, 0.75]]])  # [step, layer, head]
    dyn = DynamicsResult(steps=[10, 20, 30, 40], loss=torch.ones(4), accuracy=torch.zeros(4),
                         head_labels=["L0H0", "L0H1"], head_scores={"previous_token": prev})
    assert dyn.formed_at() == ("L0H0", 30)  # L0H0 rises by 1.0 (L0H1 by 0.5); half of it by step 30
    assert dyn.formed_at(fraction=0.25) == ("L0H0", 20) and dyn.formed_at(fraction=1.0) == ("L0H0", 40)
    flat = DynamicsResult(steps=[10, 20], loss=torch.ones(2), accuracy=torch.zeros(2), head_labels=["L0H0"],
                          head_scores={"previous_token": torch.full((2, 1, 1), 0.3)})
    assert flat.formed_at() is None and flat.to_dict()["previous_token_formed_at"] is None
    d = dyn.to_dict()
    assert d["previous_token_formed_at"] == {"head": "L0H0", "step": 30}
    assert d["scores_by_head"]["previous_token"]["L0H1"] == pytest.approx([0.25, 0.5, 0.5, 0.75])
    assert {"dynamics/loss", "dynamics/accuracy", "dynamics/previous_token"} <= set(dyn.figures())


def test_report_over_checkpoints(run, tmp_path):
    import shutil

    run_dir = Path(shutil.copytree(run.path, tmp_path / "run"))
    cfg = AnalyzeConfig(run=str(run_dir), analyses=[], over="checkpoints", device="cpu", progress=False,
                        chunk_size=16)
    cfg.batch.size, cfg.reference.size = 40, 24
    cfg.dynamics.analyses = ["attention", "ablation"]
    index = make_report(load_run(run_dir), cfg)
    data = json.loads((index.parent / "report.json").read_text())["dynamics"]
    loaded = load_run(run_dir)
    ref = checkpoint_dynamics(loaded, loaded.batch(40), reference=loaded.batch(24, seed=cfg.reference.seed),
                              analyses=["attention", "ablation"], chunk_size=16, progress=False)
    assert data["steps"] == [5, 10, 15, 20]
    assert data["loss"] == pytest.approx(ref.loss.tolist(), rel=1e-6)
    for i, h in enumerate(ref.head_labels):
        assert data["scores_by_head"]["previous_token"][h] == pytest.approx(
            ref.head_scores["previous_token"].reshape(4, -1)[:, i].tolist(), rel=1e-6)
    assert data["ablation_by_hook"]["hook_embed"] == pytest.approx(
        ref.ablation_delta_loss[:, ref.ablation_hooks.index("hook_embed")].tolist(), rel=1e-5, abs=1e-7)
    drops = [a - b for a, b in zip(ref.loss.tolist(), ref.loss.tolist()[1:], strict=False)]
    assert data["largest_loss_drop"]["to_step"] == [10, 15, 20][drops.index(max(drops))]
    names = [f["name"] for f in json.loads((index.parent / "report.json").read_text())["figures"]]
    assert {"dynamics/loss", "dynamics/previous_token", "dynamics/ablation"} <= set(names)
    assert "dynamics/copying_score" not in names  # circuits not asked for
    assert 'id="dynamics"' in index.read_text()


def test_cli_over_checkpoints_and_its_errors(run, tmp_path, monkeypatch, capsys):
    import shutil

    run_dir = Path(shutil.copytree(run.path, tmp_path / "run"))
    monkeypatch.chdir(tmp_path)

    def call(*args):
        monkeypatch.setattr(sys, "argv", ["toylens-analyze", *args])
        try:
            cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        return (code, *capsys.readouterr())

    small = ["batch.size=24", "reference.size=16", "progress=false", "device=cpu", "chunk_size=16", "analyses=[]"]
    code, out, err = call(f"run={run_dir}", *small, "over=checkpoints", "dynamics.analyses=[circuits]",
                          "dynamics.steps=[10,20]")
    assert code == 0, err
    data = json.loads((run_dir / "report" / "report.json").read_text())
    assert data["dynamics"]["steps"] == [10, 20] and len(data["dynamics"]["copying_score"]) == 2
    assert all(not math.isnan(x) for x in data["dynamics"]["fold_max_abs_logprob_diff"])
    for args, needle in [(["over=every"], "over='every'"), (["over=checkpoints", "dynamics.analyses=[dla]"],
                                                             "'dla' is not a dynamics analysis"),
                         (["over=checkpoints", "dynamics.steps=[7]"], "step=7"),
                         (["dynamics.analyses=[attention]"], "dynamics.analyses=[attention]: read only over "
                                                             "checkpoints; add over=checkpoints"),
                         (["llc.lr=1e-5"], "llc.lr=1e-5: read only over checkpoints")]:
        code, out, err = call(f"run={run_dir}", *small, *args)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and needle in lines[0], err
    with pytest.raises(ConfigError):
        from toylens.report.config import validate

        validate(AnalyzeConfig(run="x", over="all"))
