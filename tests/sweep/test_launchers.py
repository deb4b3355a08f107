"""Real multiruns of ``toylens-train -m`` through the launcher presets (configs/hydra/launcher/):
joblib with 2 workers (a failed run among them, wandb offline), a local Ray instance (every port on
127.0.0.1), submitit's local executor; the SLURM preset composed and turned into an sbatch script."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from toylens.runs import checkpoint as ck
from toylens.sweep import index as ix
from toylens.sweep.report import SweepReportConfig, make_sweep_report

from .conftest import TINY, case_dir, env, run_train, train_cmd

SMALL_REPORT = dict(batch_size=40, reference_size=24, chunk_size=20, device="cpu", progress=False, top_k=3)
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _last_stdout_line(p) -> Path:
    return Path(p.stdout.strip().splitlines()[-1])


def _group_in_wandb_file(run_dir: Path, group: str) -> bool:
    """The wandb run's group as wandb.init received it: RunRecord.run_group (protobuf field 6) in the
    offline run's .wandb log, i.e. the bytes 0x32, length, group."""
    files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))  # training's; an analysis resumes the same id
    assert files, f"no offline wandb run in {run_dir}"
    g = group.encode()
    return all(b"\x32" + bytes([len(g)]) + g in f.read_bytes() for f in files)


@pytest.fixture(scope="module")
def joblib_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("joblib")
    sweep = tmp / "sweep"
    args = ["-m", "+case=s0,s1,s2,bad", *TINY, "logger=wandb", "logger.log_checkpoint=false",
            f"hydra.searchpath=[file://{case_dir(tmp)}]", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
            f"hydra.sweep.dir={sweep}"]
    t0 = time.perf_counter()
    p = run_train(args, cwd=tmp)
    return sweep, p, time.perf_counter() - t0


def test_joblib_two_workers_a_failed_run_does_not_stop_its_siblings(joblib_sweep):
    sweep, p, wall = joblib_sweep
    assert p.returncode == 1, p.stderr[-3000:]  # a run failed: the command says so at the end
    assert _last_stdout_line(p) == sweep.resolve()
    summary = [line for line in p.stderr.splitlines() if line.startswith(f"toylens-train: sweep {sweep}")]
    assert len(summary) == 1 and "4 runs: 3 finished, 1 failed (job 3: case=bad: train/loss became nan" in summary[0]
    index = json.loads((sweep / "sweep.json").read_text())
    assert index["launcher"] == "joblib" and index["varied"] == ["case"]
    assert [(r["num"], r["status"], r["params"]["case"]) for r in index["runs"]] == [
        (0, "finished", "s0"), (1, "finished", "s1"), (2, "finished", "s2"), (3, "failed", "bad")]
    bad = index["runs"][3]
    assert bad["error"].startswith("train/loss became nan by step 5") and "\n" not in bad["error"]
    assert ix.read_record(sweep / "3")["error_type"] == "TrainingDiverged"
    # jobs ran in two worker processes, not in the launching one
    pids = {ix.read_record(sweep / str(n))["pid"] for n in range(4)}
    assert len(pids) == 2
    # each run is independent: its own seed and checkpoints
    for n in range(3):
        assert ck.list_checkpoints(sweep / str(n)) == [10, 20]
        assert index["runs"][n]["step"] == 20 and index["runs"][n]["eval_loss"] is not None
    w = [ck.load_weights(sweep / str(n), 20)["embed.W_E"] for n in range(3)]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    print(f"joblib sweep of 4 runs: {wall:.1f} s")


def test_each_run_has_its_own_wandb_run_in_the_sweeps_group(joblib_sweep):
    sweep, p, _ = joblib_sweep
    group = f"no_pos_prev_token/{sweep.name}"
    ids = set()
    for n in range(3):
        rec = ix.read_record(sweep / str(n))
        assert rec["wandb_group"] == group
        assert _group_in_wandb_file(sweep / str(n), group)
        ids |= {d.name.rsplit("-", 1)[1] for d in (sweep / str(n) / "wandb").glob("offline-run-*")}
    assert len(ids) == 3  # three separate wandb runs


def test_sweep_report_of_the_joblib_sweep_is_logged_to_wandb(joblib_sweep):
    sweep, _, _ = joblib_sweep
    index = make_sweep_report(sweep, SweepReportConfig(**SMALL_REPORT, wandb=True))
    data = json.loads((index.parent / "report.json").read_text())
    assert data["sweep"]["counts"]["finished"] == 3 and len(data["ablation"]["runs"]) == 3
    assert data["failed"][0]["num"] == 3 and data["failed"][0]["error"].startswith("train/loss became nan")
    assert data["wandb"]["used"] and data["wandb"]["group"] == f"no_pos_prev_token/{sweep.name}"
    runs = list(sweep.glob("wandb/offline-run-*"))
    assert len(runs) == 1
    assert len(list(runs[0].glob("files/media/html/sweep_report/page_*.html"))) == 1, "the page was not logged"
    table = json.loads(next(runs[0].glob("files/media/table/sweep_report/runs_*.table.json")).read_text())
    assert [row[0] for row in table["data"]] == [0, 1, 2, 3] and table["columns"][:3] == ["run", "status", "case"]
    assert _group_in_wandb_file(sweep, data["wandb"]["group"])


def _listening(root: psutil.Process) -> set[tuple[str, int]]:
    out = set()
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for proc in procs:
        try:
            out |= {(c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def test_local_ray_sweep_binds_only_loopback(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "seed=0,1,2,3", *TINY, "hydra/launcher=ray", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(train_cmd(*args), cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    root, seen = psutil.Process(proc.pid), set()
    deadline = time.time() + 400
    while proc.poll() is None and time.time() < deadline:
        seen |= _listening(root)
        time.sleep(0.5)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert len(seen) >= 3, f"no Ray sockets observed: {seen}"  # GCS, raylet, workers...: the check saw them
    assert {ip for ip, _ in seen} <= LOOPBACK, seen
    index = json.loads((sweep / "sweep.json").read_text())
    assert index["launcher"] == "ray" and [r["status"] for r in index["runs"]] == ["finished"] * 4
    assert [r["params"]["seed"] for r in index["runs"]] == ["0", "1", "2", "3"]
    assert len({ix.read_record(sweep / str(n))["pid"] for n in range(4)} - {proc.pid}) >= 2  # Ray workers
    page = make_sweep_report(sweep, SweepReportConfig(**SMALL_REPORT, wandb=False))
    data = json.loads((page.parent / "report.json").read_text())
    assert data["sweep"]["launcher"] == "ray" and len(data["ablation"]["runs"]) == 4 and data["failed"] == []


def test_submitit_local_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    p = run_train(["-m", "seed=0,1", *TINY, "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}"],
                  cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    index = json.loads((sweep / "sweep.json").read_text())
    assert index["launcher"] == "submitit_local" and [r["status"] for r in index["runs"]] == ["finished"] * 2
    assert ix.read_record(sweep / "0")["pid"] != ix.read_record(sweep / "1")["pid"]  # a process per job
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2
    assert all(ck.list_checkpoints(sweep / str(n)) == [10, 20] for n in range(2))


def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    from toylens._paths import config_dir
    from toylens.runs.config import register_configs

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_every_preset_composes_to_its_launcher():
    want = {"local": "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
            "joblib": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
            "ray": "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher",
            "submitit_local": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
            "slurm": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"}
    for name, target in want.items():
        assert _compose(f"hydra/launcher={name}").hydra.launcher._target_ == target
    ray = _compose("hydra/launcher=ray").hydra.launcher.ray
    assert ray.init.address is None and ray.init.include_dashboard is False and ray.init.dashboard_host == "127.0.0.1"
    assert _compose("hydra/launcher=ray", "hydra.launcher.ray.init.address=auto").hydra.launcher.ray.init.address == \
        "auto"


def test_slurm_preset_makes_the_sbatch_script_with_a_one_line_change(tmp_path, monkeypatch):
    """The preset plus ``hydra.launcher.partition=...``, through SlurmLauncher's own parameter mapping
    (hydra-submitit-launcher's ``launch``), up to the script submitit would hand to sbatch. Only the
    cluster check is faked (submitit looks for ``srun`` on the PATH)."""
    import submitit
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    cfg = _compose("hydra/launcher=slurm", "hydra.launcher.partition=gpu-small", f"hydra.sweep.dir={tmp_path}")
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    params = dict(launcher.params)
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    executor = submitit.AutoExecutor(cluster="slurm", folder=str(tmp_path / ".submitit" / "%j"),
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    params.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{(k if k in base else f"slurm_{k}"): v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -m toylens.train.cli", "uid").splitlines()
    for line in ("#SBATCH --partition=gpu-small", "#SBATCH --cpus-per-task=2", "#SBATCH --time=60",
                 "#SBATCH --mem=8GB"):
        assert line in script, "\n".join(script)
