"""The training loop, in-process: run-directory contract, determinism, bit-for-bit resume,
early stop, the NaN guard, and wandb offline."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from toylens.model import fused as fast_forward
from toylens.runs import checkpoint as ck
from toylens.runs.config import ConfigError, TrainConfig
from toylens.train.loop import TrainingDiverged, train


def _weights(run_dir, step=None):
    steps = ck.list_checkpoints(run_dir)
    return ck.load_weights(run_dir, steps[-1] if step is None else step)


def test_run_directory_contract(tiny, tmp_path):
    cfg = tiny()
    res = train(cfg, run_dir=tmp_path / "run")
    d = res.run_dir
    assert res.step == 20 and d == (tmp_path / "run").resolve()
    assert ck.list_checkpoints(d) == [10, 20]
    assert (d / "ckpt" / "step_000020.state.pt").is_file()
    saved = TrainConfig.from_dict(OmegaConf.to_container(OmegaConf.load(d / ".hydra" / "config.yaml")))
    assert saved == cfg  # the run can be rebuilt from its config alone
    mc = json.loads((d / "model_config.json").read_text())
    assert mc["toylens"]["positional_embedding_type"] == "none" and mc["d_model"] == 32
    rows = ck.read_metrics(d)
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert {"train/loss", "train/lr", "eval/loss", "eval/accuracy"} <= set(rows[1])
    assert rows[-1]["eval/loss"] == pytest.approx(res.eval_loss)
    # positional "none": still exactly zero after training, save and load
    assert torch.count_nonzero(_weights(d)["pos_embed.W_pos"]) == 0
    # training actually learned something
    assert rows[-1]["eval/loss"] < rows[1]["eval/loss"]
    # no stray temporary files
    assert not [p for p in d.rglob("*.tmp")]


def test_same_seed_same_weights_different_seed_different(tiny, tmp_path):
    a = _weights(train(tiny(), run_dir=tmp_path / "a").run_dir)
    b = _weights(train(tiny(), run_dir=tmp_path / "b").run_dir)
    c = _weights(train(tiny(seed=1), run_dir=tmp_path / "c").run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["embed.W_E"], c["embed.W_E"])


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resume_equals_uninterrupted(tiny, tmp_path, schedule):
    straight = train(tiny(**{"optim.schedule": schedule, "train.steps": 20}), run_dir=tmp_path / "straight").run_dir
    # the same run killed after its step-10 checkpoint: train 20 steps, then drop what came after 10
    part = tmp_path / "part"
    train(tiny(**{"optim.schedule": schedule, "train.steps": 20, "train.checkpoint_every": 10}), run_dir=part)
    ck.weights_path(part, 20).unlink()
    ck.state_path(part, 20).unlink()
    resumed = train(tiny(**{"optim.schedule": schedule, "train.steps": 20}, resume=str(part))).run_dir
    assert resumed == part.resolve()
    a, b = _weights(straight, 20), _weights(part, 20)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    sa, sb = ck.load_state(straight, 20), ck.load_state(part, 20)
    for ga, gb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values(), strict=True):
        assert torch.equal(ga["exp_avg"], gb["exp_avg"]) and torch.equal(ga["exp_avg_sq"], gb["exp_avg_sq"])
    assert ck.read_metrics(straight) == ck.read_metrics(part)  # metrics rows identical, none duplicated


def test_n_steps_then_resume_n_more_equals_2n(tiny, tmp_path):
    straight = train(tiny(**{"train.steps": 20}), run_dir=tmp_path / "straight").run_dir
    first = train(tiny(**{"train.steps": 10}), run_dir=tmp_path / "first").run_dir
    train(tiny(**{"train.steps": 20}, resume=str(first)))
    a, b = _weights(straight, 20), _weights(first, 20)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_changed_architecture_and_missing_checkpoints(tiny, tmp_path):
    run = train(tiny(), run_dir=tmp_path / "run").run_dir
    with pytest.raises(ConfigError, match="model.d_model"):
        train(tiny(**{"model.d_model": 64}, resume=str(run)))
    with pytest.raises(ConfigError, match="model.d_model"):
        train(tiny(**{"model.d_model": 64}, resume=str(run)), explicit=["model.d_model"])
    # not explicitly overridden (e.g. `toylens-train resume=<dir>` with default groups): taken from the run
    res = train(tiny(**{"model.d_model": 64, "train.steps": 30}, resume=str(run)), explicit=["resume", "train.steps"])
    assert res.step == 30
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no .hydra/config.yaml"):
        train(tiny(resume=str(tmp_path / "empty")))


def test_fresh_run_refuses_an_existing_run_directory(tiny, tmp_path):
    train(tiny(), run_dir=tmp_path / "run")
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="already holds a run"):
        train(tiny(), run_dir=tmp_path / "run")
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_invalid_config_writes_nothing(tiny, tmp_path):
    with pytest.raises(ConfigError):
        train(tiny(**{"optim.lr": -1.0}), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_early_stop_at_eval_loss(tiny, tmp_path):
    res = train(tiny(**{"train.stop_at_eval_loss": 100.0}), run_dir=tmp_path / "run")
    assert res.stopped_early and res.step == 10
    assert ck.list_checkpoints(res.run_dir) == [10]


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    real = fast_forward.forward
    calls = {"n": 0}

    def poisoned(model, tokens, *args, **kwargs):
        calls["n"] += 1
        out = real(model, tokens, *args, **kwargs)
        return out * float("nan") if calls["n"] > 13 else out  # 10 train steps + 1 eval, then 2 more

    monkeypatch.setattr(fast_forward, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="step 10") as e:
        train(tiny(), run_dir=tmp_path / "run")
    assert "\n" not in str(e.value) and "lower optim.lr" in str(e.value)
    assert ck.list_checkpoints(tmp_path / "run") == [10]
    params = {k: v for k, v in _weights(tmp_path / "run").items() if not k.endswith("IGNORE")}  # IGNORE is -inf
    assert all(torch.isfinite(v).all() for v in params.values())


def test_keep_last_k(tiny, tmp_path):
    res = train(tiny(**{"train.checkpoint_every": 5, "train.keep_last": 2}), run_dir=tmp_path / "run")
    assert ck.list_checkpoints(res.run_dir) == [15, 20]


def test_wandb_without_login_falls_back_to_offline(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = tiny(**{"logger.name": "wandb", "logger.mode": "online", "logger.project": "toylens-test"})
    res = train(cfg, run_dir=tmp_path / "run")
    err = capsys.readouterr().err
    assert err.count("logging offline") == 1
    runs = list((res.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), "wandb's local run files are missing"
    assert [r["step"] for r in ck.read_metrics(res.run_dir)] == [5, 10, 15, 20]  # local metrics kept


def test_precision_auto_is_bf16_only_where_the_hardware_has_it(monkeypatch):
    from toylens.runs.config import resolve_precision

    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32"  # emulated bf16 is many times slower
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16"
