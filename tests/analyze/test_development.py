"""Development over training in the report (``over=checkpoints dynamics.analyses=[llc]``): the LLC per checkpoint
equals ``llc_over_checkpoints`` run directly with the same settings, the traces land in report.json and in
``dynamics/llc.zarr`` alike, the stages cover every checkpoint and carry what formed in them, a bad step size
becomes a section warning naming ``llc.lr``, and bad ``llc.*`` values are one-line errors."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("devinterp")

from toylens.analyze.learning_coefficient import LLCConfig, llc_over_checkpoints  # noqa: E402
from toylens.report.build import make_report  # noqa: E402
from toylens.report.config import AnalyzeConfig, validate  # noqa: E402
from toylens.runs.config import ConfigError  # noqa: E402
from toylens.runs.run import load_run  # noqa: E402

SMALL = dict(num_chains=2, num_draws=8, n_rows=64, batch_size=16)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_run):
    return tiny_run(tmp_path_factory.mktemp("runs") / "tiny", **{"train.checkpoint_every": 5, "train.steps": 30})


def _cfg(run_dir: Path, **llc) -> AnalyzeConfig:
    cfg = AnalyzeConfig(run=str(run_dir), analyses=[], over="checkpoints", device="cpu", progress=False,
                        chunk_size=16, llc=LLCConfig(**{**SMALL, **llc}))
    cfg.batch.size, cfg.reference.size = 32, 16
    cfg.dynamics.analyses = ["attention", "llc"]
    return cfg


def test_report_llc_equals_the_direct_estimate_and_the_stages_cover_the_run(run_dir, tmp_path):
    import xarray as xr

    d = Path(shutil.copytree(run_dir, tmp_path / "run"))
    index = make_report(load_run(d), _cfg(d))
    data = json.loads((index.parent / "report.json").read_text())
    llc = data["dynamics"]["llc"]
    ref = llc_over_checkpoints(load_run(d), cfg=LLCConfig(**SMALL), progress=False)
    assert llc["steps"] == ref.steps == [5, 10, 15, 20, 25, 30]
    assert llc["llc_mean"] == pytest.approx(ref.llc_mean.tolist(), rel=1e-6)  # same seeds: the same chains
    assert torch.allclose(torch.tensor(llc["loss_trace"]), ref.loss_trace.float(), rtol=1e-6)
    ds = xr.open_zarr(index.parent / llc["file"])
    assert ds["loss_trace"].dims == ("step", "chain", "draw") and ds["loss_trace"].shape == (6, 2, 8)
    assert torch.allclose(torch.from_numpy(ds["loss_trace"].values).float(), torch.tensor(llc["loss_trace"]),
                          rtol=1e-6)
    assert list(ds["step"].values) == llc["steps"]
    dev = data["development"]
    stages = dev["stages"]
    assert stages[0]["from_step"] == 5 and stages[-1]["to_step"] == 30
    assert all(a["to_step"] == b["from_step"] for a, b in zip(stages, stages[1:], strict=False))
    loss = data["dynamics"]["loss"]
    for st in stages:
        i, j = llc["steps"].index(st["from_step"]), llc["steps"].index(st["to_step"])
        assert st["loss_drop"] == pytest.approx(loss[i] - loss[j]) and st["text"].startswith(
            f"steps {st['from_step']}–{st['to_step']}: LLC {st['kind']}")
    formed = dev["heads_formed"]  # each head that formed sits in the one stage holding its formation step
    for name, step in formed.items():
        hits = [st for st in stages if any(h["name"] == name for h in st["heads_formed"])]
        assert len(hits) == 1 and hits[0]["from_step"] <= step <= hits[0]["to_step"]
    names = [f["name"] for f in data["figures"]]
    assert {"development/shared_axis", "dynamics/llc/curve", "dynamics/llc/traces"} <= set(names)
    assert data["errors"] == []


def test_a_diverging_step_size_is_a_warning_naming_llc_lr(run_dir, tmp_path):
    d = Path(shutil.copytree(run_dir, tmp_path / "run"))
    index = make_report(load_run(d), _cfg(d, lr=1.0))
    data = json.loads((index.parent / "report.json").read_text())
    warned = data["dynamics"]["llc"]["warnings"]
    assert set(warned) == {str(s) for s in data["dynamics"]["llc"]["steps"]}
    assert all(w[0]["check"] == "diverged" and w[0]["key"] == "llc.lr" for w in warned.values())
    page = index.read_text()
    assert "LLC chain health (diverged) at 6 of 6 checkpoints" in page and "lower llc.lr" in page
    dev = data["development"]  # no stages read off a curve that means nothing
    assert dev["stages"] == [] and dev["skipped"].startswith("the LLC chains diverged at 6 of 6 checkpoints")
    assert "Stages not read" in page


@pytest.mark.parametrize("key,value,needle", [
    ("num_draws", 4, "llc.num_draws=4 must be at least 8"),
    ("lr", 0.0, "llc.lr=0.0 must be positive"),
    ("n_rows", 8, "llc.n_rows=8 must be at least llc.batch_size=16"),
    ("burnin", 8, "llc.burnin=8 must lie in [0, llc.num_draws=8)"),
])
def test_bad_llc_settings_are_one_line(run_dir, key, value, needle):
    with pytest.raises(ConfigError, match=None) as e:
        validate(_cfg(run_dir, **{key: value}))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_without_devinterp_the_llc_is_refused_before_any_work(run_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "devinterp", None)  # import devinterp -> ImportError
    with pytest.raises(ConfigError) as e:
        validate(_cfg(run_dir))
    assert str(e.value) == ("dynamics.analyses=[llc]: the LLC needs devinterp: pip install 'toylens[devinterp]' "
                            "(devinterp==2.0.1)")
    cfg = _cfg(run_dir)
    cfg.dynamics.analyses = ["attention"]
    validate(cfg)  # not asked for: not needed


def test_a_modular_add_run_lines_its_stages_up_with_the_grokking_phases(tmp_path, tiny_run):
    from toylens.data import TASKS
    from toylens.runs.config import ModelConfig

    d = tiny_run(tmp_path / "mod", **{
        "task": TASKS["modular_add"].config_cls(p=11, frac_train=0.4, split_seed=2),
        "model": ModelConfig(n_layers=1, d_model=32, n_heads=2, d_head=16, d_mlp=40, act_fn="relu",
                             normalization_type=None, positional_embedding_type="standard"),
        "train.checkpoint_every": 10, "train.steps": 150, "optim.lr": 1e-2, "train.keep_last": 100})
    cfg = _cfg(d)
    cfg.analyses = ["fourier"]
    index = make_report(load_run(d), cfg)
    data = json.loads((index.parent / "report.json").read_text())
    grok = data["dynamics_canon"]["grokking"]
    spans = {k: v for k, v in grok["phases"].items() if k != "note" and v}
    assert spans and data["development"]["stages"][-1]["to_step"] == 150
    for st in data["development"]["stages"]:  # each stage names exactly the located phases it overlaps
        want = [k for k, v in spans.items() if v[0] < st["to_step"] and v[1] > st["from_step"]]
        assert st["grokking_phases"] == want
    assert "development/shared_axis" in [f["name"] for f in data["figures"]]
