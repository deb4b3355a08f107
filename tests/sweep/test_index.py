"""The sweep index on its own: records and ``sweep.json`` under concurrent writers, stale ``running``
records, the planned jobs (Hydra's own expansion), the start-of-sweep checks, the summary line."""

from __future__ import annotations

import json
import multiprocessing as mp
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from toylens.sweep import index as ix
from toylens.sweep.callback import BASIC_SWEEPER, SweepIndexCallback, check_launcher, planned_jobs


def _worker(sweep: str, num: int, rounds: int) -> None:
    run_dir = Path(sweep) / str(num)
    for i in range(rounds):
        status = "finished" if i == rounds - 1 else "running"
        ix.write_record(run_dir, {"num": num, "overrides": [f"seed={num}"], "status": status, "step": i,
                                  **ix.process_info()})
        ix.update_index(Path(sweep))


def test_concurrent_writers_leave_a_complete_index(tmp_path):
    sweep = tmp_path / "sweep"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(str(sweep), n, 15)) for n in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    index = json.loads((sweep / "sweep.json").read_text())  # the last writer saw every final record
    assert [(r["num"], r["status"], r["step"]) for r in index["runs"]] == [(n, "finished", 14) for n in range(4)]
    assert index["counts"]["finished"] == 4 and index["varied"] == ["seed"]
    assert index["runs"][2]["label"] == "2: seed=2" and index["runs"][2]["params"] == {"seed": "2"}
    leftovers = [p.name for p in sweep.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_running_record_of_a_dead_process_is_interrupted(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        rec = {"num": 0, "status": "running", "pid": proc.pid, "host": socket.gethostname(),
               "proc_start": ix._proc_start(proc.pid)}
        assert rec["proc_start"] is not None
        assert ix.process_alive(rec) is True and ix.effective_status(rec) == "running"
        assert ix.effective_status({**rec, "proc_start": "1"}) == "interrupted"  # the pid now names another process
        assert ix.effective_status({**rec, "host": "elsewhere"}) == "running"  # cannot tell on another host
    finally:
        proc.kill()
        proc.wait()
    assert ix.process_alive(rec) is False and ix.effective_status(rec) == "interrupted"
    ix.write_record(tmp_path / "0", rec)
    index = ix.update_index(tmp_path)
    assert index["runs"][0]["status"] == "interrupted" and index["counts"]["interrupted"] == 1
    assert ix.summary_line(index) == "1 runs: 1 interrupted (job 0: interrupted)"


def _config(tmp_path: Path, task: list[str], params: dict | None = None, target: str = BASIC_SWEEPER):
    return OmegaConf.create({"hydra": {
        "sweeper": {"_target_": target, "params": params or {}},
        "sweep": {"dir": str(tmp_path / "sweep")},
        "overrides": {"task": task},
        "launcher": {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"},
        "runtime": {"choices": {"hydra/launcher": "local"}}}})


def test_planned_jobs_in_job_number_order(tmp_path):
    cfg = _config(tmp_path, ["seed=0,1", "optim.lr=1e-3,3e-3", "debug=fast"])
    # as Hydra hands them to the jobs (floats normalised): the launcher tests check jobs get exactly these
    assert planned_jobs(cfg) == [["seed=0", "optim.lr=0.001", "debug=fast"], ["seed=0", "optim.lr=0.003", "debug=fast"],
                                 ["seed=1", "optim.lr=0.001", "debug=fast"], ["seed=1", "optim.lr=0.003", "debug=fast"]]
    assert planned_jobs(_config(tmp_path, ["seed=0,1"], params={"model.d_model": "32,64"}))[1] == \
        ["model.d_model=32", "seed=1"]
    assert planned_jobs(_config(tmp_path, ["seed=0,1"], target="hydra_plugins.optuna.Sweeper")) is None


def test_multirun_start_writes_pending_jobs_and_refuses_another_sweeps_dir(tmp_path, capsys):
    cb = SweepIndexCallback()
    cfg = _config(tmp_path, ["seed=0,1,2"])
    cb.on_multirun_start(cfg)
    index = ix.read_index(tmp_path / "sweep")
    assert [(r["num"], r["status"], r["overrides"]) for r in index["runs"]] == [
        (0, "pending", ["seed=0"]), (1, "pending", ["seed=1"]), (2, "pending", ["seed=2"])]
    OmegaConf.save(OmegaConf.create({"hydra": {"overrides": {"task": ["seed=0,1,2"]}}}),
                   tmp_path / "sweep" / "multirun.yaml")
    cb.on_multirun_start(cfg)  # the same sweep again: fine
    with pytest.raises(SystemExit) as e:
        cb.on_multirun_start(_config(tmp_path, ["seed=0,1,2,3"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert "holds a sweep of other overrides (seed=0,1,2)" in err[0] and "new hydra.sweep.dir" in err[0]


def test_multirun_end_exits_1_when_a_run_did_not_finish(tmp_path, capsys):
    cfg = _config(tmp_path, ["seed=0,1"])
    sweep = tmp_path / "sweep"
    ix.write_record(sweep / "0", {"num": 0, "overrides": ["seed=0"], "status": "finished"})
    ix.write_record(sweep / "1", {"num": 1, "overrides": ["seed=1"], "status": "failed", "error": "boom"})
    with pytest.raises(SystemExit) as e:
        SweepIndexCallback().on_multirun_end(cfg)
    out, err = capsys.readouterr()
    assert e.value.code == 1 and out.strip() == str(sweep.resolve())
    assert "2 runs: 1 finished, 1 failed (job 1: seed=1: boom)" in err
    ix.write_record(sweep / "1", {"num": 1, "overrides": ["seed=1"], "status": "finished"})
    SweepIndexCallback().on_multirun_end(cfg)  # all finished: returns, exit status 0
    assert ix.read_index(sweep)["counts"]["finished"] == 2


def test_missing_launcher_plugin_is_one_line_with_the_install_command(tmp_path, capsys):
    cfg = _config(tmp_path, ["seed=0,1"])
    cfg.hydra.launcher._target_ = "hydra_plugins.hydra_ray_launcher_missing.ray_launcher.RayLauncher"
    cfg.hydra.runtime.choices["hydra/launcher"] = "ray"
    with pytest.raises(SystemExit) as e:
        check_launcher(cfg)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "hydra/launcher=ray" in err[0] and "toylens[ray]" in err[0]
    check_launcher(_config(tmp_path, ["seed=0"]))  # the basic launcher is always there


def test_one_line():
    assert ix.one_line(ValueError("a\n  b")) == "a b"
    assert ix.one_line(KeyError("x")) == "KeyError: 'x'"
    assert ix.one_line(RuntimeError()) == "RuntimeError"
    assert len(ix.one_line("y" * 500)) == 300
