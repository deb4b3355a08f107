"""A ``task=sequences`` run whose data file moved: ``load_run``, ``toylens-analyze`` and ``toylens-train resume=`` say
which file is gone and how to point at it (``data_path=``), then read it there, checked against the SHA-256 the run
recorded. Also the command lines around ``task.path`` (``--help``, no path given) and the resume note's arithmetic."""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import tiny_config
from toylens.data.tasks.sequences import SequencesConfig
from toylens.runs import checkpoint as ck
from toylens.runs.run import RunError, load_run

SMALL = ["batch.size=16", "reference.size=16", "progress=false", "device=cpu", "max_tokens=6", "chunk_size=16"]


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    """A run trained on ``data/seqs.npy``, then the file moved to ``moved/seqs.npy``: (run, old path, new path)."""
    from toylens.train.loop import train

    root = tmp_path_factory.mktemp("moved")
    old = root / "data" / "seqs.npy"
    old.parent.mkdir()
    rng = np.random.default_rng(0)
    np.save(old, (rng.integers(0, 9, (200, 1)) + np.arange(8)[None]) % 9)
    cfg = tiny_config(root, **{"train.steps": 10, "train.checkpoint_every": 10})
    cfg.task = SequencesConfig(path=str(old))
    run = train(cfg).run_dir
    new = root / "moved" / "seqs.npy"
    new.parent.mkdir()
    shutil.move(old, new)
    return run, old, new


def _call(monkeypatch, capsys, module, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["prog", *args])
    code = 0
    try:
        module.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err: str, prog: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: ") and "Traceback" not in err, err
    return lines[0]


def test_load_run_names_the_gone_file_and_data_path_points_at_it(moved, tmp_path):
    run_dir, old, new = moved
    with pytest.raises(RunError) as e:
        load_run(run_dir)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"task.path={old}: the data file of the run {run_dir} is gone")
    assert "data_path=<where it is now>" in msg and "relative to where you run" not in msg
    run = load_run(run_dir, data_path=new)
    rows = {tuple(r) for r in np.load(new).tolist()}
    assert run.task.path == new and all(tuple(r) in rows for r in run.batch(8).tokens.tolist())
    recorded = run.config.task.sha256
    assert recorded == hashlib.sha256(new.read_bytes()).hexdigest()
    changed = tmp_path / "changed.npy"
    np.save(changed, np.load(new)[::-1].copy())
    now = hashlib.sha256(changed.read_bytes()).hexdigest()
    with pytest.warns(UserWarning, match=rf"sha256 was {recorded[:12]}, now {now[:12]}"):
        assert load_run(run_dir, data_path=changed).task.seq_len == 8
    garbage = tmp_path / "garbage.npy"
    garbage.write_text("not numpy\n")
    with pytest.warns(UserWarning, match="changed since the run"), pytest.raises(RunError) as e:
        load_run(run_dir, data_path=garbage).task  # noqa: B018  (a task that cannot be rebuilt: RunError, one line)
    assert "not a numpy .npy array file" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(RunError, match=r"data_path=.*nowhere.npy: no such file"):
        load_run(run_dir, data_path=tmp_path / "nowhere.npy")


def test_toylens_analyze_of_a_run_whose_data_moved(moved, tmp_path, monkeypatch, capsys):
    from toylens.report import cli

    run_dir, old, new = moved
    monkeypatch.chdir(tmp_path)
    code, out, err = _call(monkeypatch, capsys, cli, f"run={run_dir}", "analyses=[attention]", *SMALL)
    line = _one_line(err, "toylens-analyze")
    assert code == 2 and f"task.path={old}" in line and "data_path=" in line and out == ""
    assert not (run_dir / "report").exists()
    code, out, err = _call(monkeypatch, capsys, cli, f"run={run_dir}", "task.path=x.npy", *SMALL)
    assert code == 2 and "task.path=x.npy: a run's task settings are fixed" in _one_line(err, "toylens-analyze")
    assert "pass data_path=x.npy" in err
    code, out, err = _call(monkeypatch, capsys, cli, f"run={run_dir}", f"data_path={new}", "analyses=[attention]",
                           *SMALL)
    assert code == 0, err
    assert out.strip().splitlines()[-1] == str(run_dir / "report" / "index.html")


def test_toylens_train_resume_of_a_run_whose_data_moved(moved, tmp_path, monkeypatch, capsys):
    from toylens.runs.config import ConfigError, validate
    from toylens.train import cli

    run_dir, old, new = moved
    run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    monkeypatch.chdir(tmp_path)
    code, out, err = _call(monkeypatch, capsys, cli, f"resume={run}", "train.steps=20")
    line = _one_line(err, "toylens-train")
    assert code == 2 and f"task.path={old}" in line and "data_path=<where it is now>" in line
    code, out, err = _call(monkeypatch, capsys, cli, f"resume={run}", "train.steps=20", f"task.path={new}")
    assert code == 2 and f"pass data_path={new} instead" in _one_line(err, "toylens-train")
    assert ck.list_checkpoints(run) == [10]
    code, out, err = _call(monkeypatch, capsys, cli, f"resume={run}", "train.steps=20", f"data_path={new}")
    assert code == 0, err
    assert ck.list_checkpoints(run) == [10, 20]
    fresh = tiny_config(tmp_path, data_path=str(new))
    with pytest.raises(ConfigError, match=r"^data_path=.* only points a resumed run at its moved data file; for a "
                                          r"new run set task.path="):
        validate(fresh)


def test_help_and_a_missing_path_of_task_sequences(tmp_path, monkeypatch, capsys):
    from toylens.train import cli

    monkeypatch.chdir(tmp_path)
    code, out, err = _call(monkeypatch, capsys, cli, "--help", "task=sequences")
    assert code == 0 and "task.path=<required>" in out and "Traceback" not in err, err
    code, out, err = _call(monkeypatch, capsys, cli, "--help", "task=sequences", "task.path=x.npy")
    assert code == 0 and "task.path=x.npy " in out, err
    code, out, err = _call(monkeypatch, capsys, cli, "task=sequences")
    line = _one_line(err, "toylens-train")
    assert code == 2 and line.startswith("toylens-train: error: task.path=???: a value is required (there is no "
                                         "default); add task.path=<value>"), line
    code, out, err = _call(monkeypatch, capsys, cli, "task=prev_token", "task.d_vocab=abc")
    assert code == 2 and _one_line(err, "toylens-train").endswith("task.d_vocab='abc': expected an int (e.g. "
                                                                  "task.d_vocab=300)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("start,schedule,steps,first", [(200, 100, 250, 201), (200, 220, 250, 221),
                                                        (20, 20, 30, 21)])
def test_the_resume_note_names_the_steps_still_to_run_at_the_final_rate(start, schedule, steps, first):
    from toylens.train.loop import resume_note

    note = resume_note(start, schedule, steps)
    assert f"resuming at step {start};" in note and f"keeps its {schedule} steps, so steps {first}-{steps} run" in note


def test_a_sweep_job_naming_the_file_relatively_resumes_its_pinned_run(moved, tmp_path, monkeypatch):
    """A sweep job resumes with its own overrides (task=sequences task.path=seqs.npy): compared as the run records
    them (absolute path, pinned vocabulary), they are the run's own, not a change."""
    from toylens.train.resume import reconcile

    run_dir, old, new = moved
    run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    monkeypatch.chdir(new.parent)
    requested = tiny_config(tmp_path, resume=str(run), data_path=str(new), **{"train.steps": 20})
    requested.task = SequencesConfig(path="seqs.npy")
    cfg = reconcile(requested, ["task", "task.path", "resume", "data_path", "train.steps"])
    assert (cfg.task.path, cfg.task.d_vocab, cfg.train.steps) == (str(new), 9, 20)
    requested.task = SequencesConfig(path="seqs.npy", frac_train=0.5)
    with pytest.raises(ValueError, match=r"resume: task.frac_train=0.5 differs from the run being resumed \(0.9\)"):
        reconcile(requested, ["task", "task.path", "task.frac_train", "resume", "data_path"])
