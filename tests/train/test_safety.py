"""Issue 11 in-process: no checkpoint with NaN, checksums, symlinks, unresolved saved configs, the run
lock, resume fallbacks and leftovers, Ctrl-C, the kept lr schedule, stop targets and threads."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from toylens.runs import checkpoint as ck
from toylens.runs.checkpoint import CheckpointError
from toylens.runs.config import ConfigError, OptimConfig, TrainConfig, validate
from toylens.runs.lock import RunLock, RunLockedError
from toylens.train import loop
from toylens.train.loop import TrainingDiverged, TrainingInterrupted, train


def _equal(a_dir, b_dir, step):
    a, b = ck.load_weights(a_dir, step), ck.load_weights(b_dir, step)
    return all(torch.equal(a[k], b[k]) for k in a)


def _finite(run_dir, step):
    w = {k: v for k, v in ck.load_weights(run_dir, step).items() if not k.endswith("IGNORE")}
    st = ck.load_state(run_dir, step)["optimizer"]["state"]
    return all(bool(v.isfinite().all()) for v in w.values()) and all(
        bool(t.isfinite().all()) for s in st.values() for t in s.values() if torch.is_tensor(t))


def test_a_diverging_run_never_checkpoints_non_finite_values(tiny, tmp_path):
    cfg = tiny(**{"optim.lr": 100.0, "optim.grad_clip": None, "optim.warmup_steps": 0, "train.steps": 60,
                  "train.checkpoint_every": 1, "train.keep_last": 100, "train.log_every": 60})
    with pytest.raises(TrainingDiverged) as e:
        train(cfg, run_dir=tmp_path / "run")
    steps = ck.list_checkpoints(tmp_path / "run")
    assert all(_finite(tmp_path / "run", s) for s in steps)
    msg = str(e.value)
    assert "\n" not in msg and f"last finite checkpoint: step {steps[-1]}" in msg if steps else "none" in msg
    assert "optim.grad_clip=1.0" in msg and "optim.warmup_steps" in msg


def test_nan_advice_names_only_settings_not_already_set():
    clipped = loop._fix_for_divergence(OptimConfig(lr=100.0, grad_clip=1.0, warmup_steps=100))
    assert clipped == "lower optim.lr (now 100)"
    bare = loop._fix_for_divergence(OptimConfig(lr=1.0, grad_clip=None, warmup_steps=0))
    assert "optim.grad_clip=1.0" in bare and "optim.warmup_steps=100" in bare


def test_a_flipped_bit_is_caught_by_the_checksum(tiny_run, tmp_path):
    from toylens.runs.run import load_run

    run = tiny_run(tmp_path / "run")
    w = ck.weights_path(run, 20)
    data = bytearray(w.read_bytes())
    data[-3] ^= 0x40  # an exponent bit of the last float: loads fine, one value becomes huge
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum") as e:
        ck.load_weights(run, 20)
    assert str(w) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="checksum"):
        load_run(run).model()


def test_symlinked_checkpoints_are_refused(tiny_run, tmp_path):
    run = tiny_run(tmp_path / "run")
    outside = tmp_path / "outside.safetensors"
    w = ck.weights_path(run, 20)
    shutil.move(w, outside)
    w.symlink_to(outside)
    with pytest.raises(CheckpointError, match="symlink"):
        ck.load_weights(run, 20)
    ck.state_path(run, 20).rename(tmp_path / "s.pt")
    ck.state_path(run, 20).symlink_to(tmp_path / "s.pt")
    with pytest.raises(CheckpointError, match="symlink"):
        ck.load_state(run, 20)


def test_saved_config_is_read_without_resolving_the_environment(tiny_run, tmp_path, monkeypatch):
    from toylens.runs.run import load_run
    from toylens.train.resume import load_run_config

    run = tiny_run(tmp_path / "run")
    path = run / ".hydra" / "config.yaml"
    path.write_text(path.read_text().replace("name: tiny", "name: ${oc.env:TOYLENS_SECRET}"))
    monkeypatch.setenv("TOYLENS_SECRET", "hunter2")
    assert load_run(run).config.name == "${oc.env:TOYLENS_SECRET}"
    assert load_run_config(run).name == "${oc.env:TOYLENS_SECRET}"


def test_python_api_accepts_a_task_name():
    cfg = TrainConfig(task="induction")
    validate(cfg)
    assert cfg.task.name == "induction"
    with pytest.raises(ConfigError, match="is not a task; did you mean induction"):
        validate(TrainConfig(task="inductoin"))


def test_stop_at_accuracy_and_the_summary_line(tiny, tmp_path):
    res = train(tiny(**{"train.stop_at_accuracy": 0.01}), run_dir=tmp_path / "run")
    assert res.stopped_early and res.step == 10 and res.stop_reason.startswith("eval/accuracy ")
    assert res.summary().startswith("stopped at step 10: eval/accuracy ") and ">= 0.01" in res.summary()
    res = train(tiny(), run_dir=tmp_path / "full")
    assert res.summary() == f"step 20, eval/loss {res.eval_loss:.4g}, eval/accuracy {res.eval_accuracy:.4g}"


def test_resume_keeps_the_original_lr_schedule(tiny, tmp_path, capsys):
    sched = {"optim.schedule": "cosine", "optim.min_lr_ratio": 0.1}
    first = train(tiny(**sched), run_dir=tmp_path / "ext").run_dir
    train(tiny(**sched, **{"train.steps": 30}, resume=str(first)), explicit=["resume", "train.steps"])
    assert "keeps its 20 steps" in capsys.readouterr().err
    # the same as one run of 30 steps whose schedule is 20 steps long: bit for bit
    straight = train(tiny(**sched, **{"train.steps": 30, "optim.schedule_steps": 20}), run_dir=tmp_path / "s").run_dir
    assert _equal(first, straight, 30)
    lrs = {r["step"]: r["train/lr"] for r in ck.read_metrics(first)}
    assert lrs[25] == lrs[30] == pytest.approx(0.1 * 3e-3)


def test_run_without_a_checkpoint_can_be_resumed_or_started_over(tiny, tmp_path, capsys):
    straight = train(tiny(), run_dir=tmp_path / "straight").run_dir
    for how in ("resume", "fresh"):
        d = tmp_path / how
        train(tiny(), run_dir=d)
        shutil.rmtree(d / "ckpt")  # as if killed before its first checkpoint
        if how == "resume":
            train(tiny(resume=str(d)))
            assert "no checkpoint yet" in capsys.readouterr().err
        else:
            train(tiny(), run_dir=d)
            assert "starting it over" in capsys.readouterr().err
        assert _equal(straight, d, 20) and ck.read_metrics(straight) == ck.read_metrics(d)


def test_resume_skips_a_truncated_checkpoint_and_cleans_leftovers(tiny, tmp_path, capsys):
    straight = train(tiny(), run_dir=tmp_path / "straight").run_dir
    part = train(tiny(), run_dir=tmp_path / "part").run_dir
    w = ck.weights_path(part, 20)
    w.write_bytes(w.read_bytes()[:200])
    leftovers = [part / "ckpt" / ".step_000030.safetensors.k3j.tmp", part / ".metrics.jsonl.x1.tmp",
                 ck.state_path(part, 40)]
    for p in leftovers:
        p.write_bytes(b"half")
    train(tiny(resume=str(part)))
    err = capsys.readouterr().err
    assert "skipped checkpoint step 20" in err and "resuming from step 10" in err and "removed 3 leftover" in err
    assert not any(p.exists() for p in leftovers) and (part / "ckpt" / "step_000020.safetensors.corrupt").exists()
    assert _equal(straight, part, 20)


def test_one_process_per_run_directory(tiny, tmp_path):
    run = train(tiny(), run_dir=tmp_path / "run").run_dir
    lock = RunLock(run).acquire()
    try:
        with pytest.raises(RunLockedError, match=f"in use by process {os.getpid()}"):
            train(tiny(**{"train.steps": 30}, resume=str(run)), explicit=["resume", "train.steps"])
        with pytest.raises(RunLockedError):
            train(tiny(), run_dir=run)
    finally:
        lock.release()
    (run / ".toylens.lock").write_text("999999\n")  # a stale lock file from a killed process
    assert train(tiny(**{"train.steps": 30}, resume=str(run)), explicit=["resume", "train.steps"]).step == 30


def test_ctrl_c_names_the_step_and_the_last_checkpoint(tiny, tmp_path, monkeypatch):
    real = loop.make_train_step

    def interrupting(*args, **kwargs):
        step, calls = real(*args, **kwargs), {"n": 0}

        def wrapped():
            calls["n"] += 1
            if calls["n"] == 15:
                raise KeyboardInterrupt
            return step()

        return wrapped

    monkeypatch.setattr(loop, "make_train_step", interrupting)
    with pytest.raises(TrainingInterrupted) as e:
        train(tiny(), run_dir=tmp_path / "run")
    assert str(e.value) == (f"interrupted at step 14; the last checkpoint is step 10; continue with "
                            f"toylens-train resume={(tmp_path / 'run').resolve()}")


def test_threads_setting_applies_during_training_only(tiny, tmp_path, monkeypatch):
    seen = []
    real = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1])
    torch.set_num_threads(2)
    try:
        train(tiny(threads=1), run_dir=tmp_path / "run")
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_threads_auto_is_one_on_a_busy_machine_else_one_per_core(monkeypatch):
    import os

    from toylens.runs.config import resolve_threads

    assert resolve_threads(3) == 3 and resolve_threads(None) is None
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 0.0, 0.0))
    assert resolve_threads(0) == 1  # other work keeps the cores busy
    monkeypatch.setattr(os, "getloadavg", lambda: (0.5, 0.0, 0.0))
    assert resolve_threads(0) == 4
