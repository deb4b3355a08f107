"""``toylens-train`` as a user runs it: in a subprocess, from a scratch working directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from toylens.runs import checkpoint as ck

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.d_model=32", "model.d_head=16", "model.n_heads=2", "model.d_mlp=64", "task.d_vocab=20",
        "task.seq_len=12", "train.eval_size=64", "train.progress=false", "device=cpu"]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", HYDRA_FULL_ERROR="0", **extra)
    env.pop("WANDB_API_KEY", None)
    return env


def run_cli(args, cwd, **kw):
    return subprocess.run([sys.executable, "-m", "toylens.train.cli", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=300, **kw)


def test_smoke_run_prints_its_run_directory(tmp_path):
    p = run_cli(["experiment=no_pos_prev_token", "debug=fast", *TINY], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    run_dir = Path(p.stdout.strip().splitlines()[-1])
    assert run_dir.parent == tmp_path / "checkpoints" / "no_pos_prev_token"
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "model_config.json").is_file()
    saved = (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert "experiment=no_pos_prev_token" in saved and "model.d_model=32" in saved
    assert ck.list_checkpoints(run_dir) == [10, 20]
    assert [r["step"] for r in ck.read_metrics(run_dir)] == [5, 10, 15, 20]
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("override,field", [
    ("model.n_heads=3", "model.d_model"),
    ("model.n_ctx=4", "model.n_ctx"),
    ("optim.lr=0", "optim.lr"),
    ("model.rotary_dim=8", "model.rotary_dim"),
])
def test_invalid_config_exits_2_with_one_line_and_leaves_nothing(tmp_path, override, field):
    p = run_cli(["experiment=no_pos_prev_token", "debug=fast", *TINY, override], cwd=tmp_path)
    assert p.returncode == 2
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and field in lines[0] and lines[0].startswith("toylens-train: error:"), p.stderr
    assert list(tmp_path.iterdir()) == []  # not even an empty checkpoints/


def test_typo_fails_at_composition_without_a_run_directory(tmp_path):
    p = run_cli(["model.d_modle=64"], cwd=tmp_path)
    assert p.returncode == 2 and "d_modle" in p.stderr and "Traceback" not in p.stderr
    assert "+model" not in p.stderr and "did you mean model.d_model" in p.stderr
    assert list(tmp_path.iterdir()) == []


# --- the catalogue (issue 11): each bad command line is exit 2, one line naming the field, and
# nothing written anywhere (no run directory, no empty checkpoints/ in the working directory).
# In-process: the config is composed and validated before Hydra starts, so nothing heavy runs.
CATALOGUE = [
    (["task.d_vocab=1"], "task.d_vocab"),
    (["task.seq_len=1"], "task.seq_len"),
    (["task=modular_add", "task.p=1"], "task.p"),
    (["task=icl", "task.ks=[0,1,5]"], "task.ks"),
    (["task=icl", "task.rule=shift"], "task.group_size"),
    (["task=icl", "task.n_symbols=2"], "task.n_symbols"),
    (["task=induction", "task.half_len=1"], "task.half_len"),
    (["task=copy", "task.length=0"], "task.length"),
    (["optim.eps=-1"], "optim.eps"),
    (["optim.lr=inf"], "optim.lr"),
    (["model.rotary_base=0"], "model.rotary_base"),
    (["model=no_pos_2l", "model.rotary_base=500"], "model.rotary_base"),
    (["model=no_pos_2l", "model.rotary_dim=8"], "model.rotary_dim"),
    (["device=mps"], "device=mps"),
    (["model.d_model=1000000000"], "model.d_model"),
    (["train.batch_size=100000000"], "train.batch_size"),
    (["train.eval_size=100000000"], "train.eval_size"),
    (["checkpoint_root=/proc/forbidden"], "checkpoint_root"),
    (["+model.d_modle=128"], "model.d_modle"),
    (["+train.stepz=5"], "train.stepz"),
    (["++train.stepz=5"], "train.stepz"),
    (["+foo=1"], "foo"),
    (["model.d_modle=128"], "model.d_modle"),
    (["task=nonexistent_task"], "task=nonexistent_task"),
    (["optim.lr=fast"], "optim.lr"),
    (["train.stop_at_accuracy=2"], "train.stop_at_accuracy"),
    (["threads=-1"], "threads"),
    (["optim.schedule_steps=0"], "optim.schedule_steps"),
    (["seed=[1"], "seed=[1"),
]


def _main_in_process(monkeypatch, capsys, args):
    from toylens.train import cli

    monkeypatch.setattr(sys, "argv", ["toylens-train", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, *capsys.readouterr()


def _everything(d: Path) -> list:
    return sorted(str(p) for p in d.rglob("*"))


@pytest.mark.parametrize("args,field", CATALOGUE, ids=[" ".join(a) for a, _ in CATALOGUE])
def test_catalogue_exit_2_one_line_field_named_nothing_written(tmp_path, monkeypatch, capsys, args, field):
    monkeypatch.chdir(tmp_path)
    code, out, err = _main_in_process(monkeypatch, capsys, ["debug=fast", "device=cpu", *args])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert 1 <= len(lines) <= 2 and "Traceback" not in err and field in lines[0], err
    assert lines[0].startswith("toylens-train: error:")
    assert "_schema" not in err and "+model.d_model" not in err
    assert out == "" and _everything(tmp_path) == []


def test_unknown_option_lists_no_schema_entries(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = _main_in_process(monkeypatch, capsys, ["task=nonexistent_task"])
    assert code == 2 and "prev_token" in err and "induction" in err and "schema" not in err


def test_corrupt_saved_config_on_resume_is_one_line(tmp_path, monkeypatch, capsys, tiny_run):
    run = tiny_run(tmp_path / "run")
    (run / ".hydra" / "config.yaml").write_text("model: [unclosed\n")
    monkeypatch.chdir(tmp_path)
    before = _everything(tmp_path)
    code, out, err = _main_in_process(monkeypatch, capsys, [f"resume={run}"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "config.yaml" in err and "Traceback" not in err
    assert _everything(tmp_path) == before


def test_help_says_what_it_does_and_lists_groups_and_keys(monkeypatch, capsys):
    code, out, err = _main_in_process(monkeypatch, capsys, ["--help"])
    assert code == 0 and out.startswith("toylens-train: train a small TransformerLens model")
    assert "_schema" not in out
    for needle in ("task=", "prev_token", "-m ", "resume=<run dir>", "hydra/launcher=", "joblib",
                   "model.d_model=128", "train.stop_at_accuracy", "threads=0"):
        assert needle in out, needle
    keys = [line.split()[0] for line in out.splitlines() if line.startswith("  ") and "=" in line.split()[0]]
    assert len(keys) == len(set(keys)) > 40  # one line per key


def test_multirun_gives_one_directory_per_seed(tmp_path):
    p = run_cli(["-m", "seed=0,1,2", "experiment=no_pos_prev_token", "debug=fast", *TINY], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    sweeps = list((tmp_path / "checkpoints" / "no_pos_prev_token" / "multirun").iterdir())
    assert len(sweeps) == 1
    runs = sorted(d for d in sweeps[0].iterdir() if d.is_dir())
    assert [d.name for d in runs] == ["0", "1", "2"]
    weights = [ck.load_weights(d, 20)["embed.W_E"] for d in runs]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    args = ["experiment=no_pos_prev_token", *TINY, "train.batch_size=64", "train.steps=400", "train.eval_every=50",
            "train.checkpoint_every=20", "train.keep_last=100", "train.stop_at_eval_loss=null",
            "threads=1"]  # auto threads follow the load average: the two runs must sum in the same order
    straight = run_cli([*args, f"hydra.run.dir={tmp_path / 'straight'}"], cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "toylens.train.cli", *args, f"hydra.run.dir={killed}"],
                            cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not any(s >= 100 for s in ck.list_checkpoints(killed)):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = ck.list_checkpoints(killed)
    assert steps and steps[-1] < 400, f"the run was not killed mid-way: {steps}"
    resumed = run_cli([f"resume={killed}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert Path(resumed.stdout.strip().splitlines()[-1]) == killed
    a, b = ck.load_weights(tmp_path / "straight", 400), ck.load_weights(killed, 400)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"
    assert ck.read_metrics(tmp_path / "straight") == ck.read_metrics(killed)


def test_installed_wheel_finds_its_configs_from_any_directory(tmp_path):
    dist = tmp_path / "dist"
    b = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(REPO)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert b.returncode == 0, b.stderr[-2000:]
    wheel = next(dist.glob("toylens-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "toylens/configs/train.yaml" in names and "toylens/configs/experiment/no_pos_prev_token.yaml" in names
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = _env(PYTHONPATH=str(site))  # the wheel's toylens shadows the editable checkout
    p = subprocess.run([sys.executable, "-c", "import toylens, toylens._paths as p; print(toylens.__file__); "
                        "print(p.config_dir())"], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert p.stdout.splitlines()[0].startswith(str(site)) and p.stdout.splitlines()[1].startswith(str(site)), p
    p = subprocess.run([sys.executable, "-m", "toylens.train.cli", "experiment=no_pos_prev_token", "debug=fast", *TINY],
                       cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert ck.list_checkpoints(Path(p.stdout.strip().splitlines()[-1])) == [10, 20]


def test_every_module_is_in_a_listed_package():
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "toylens").rglob("*.py")}
    assert on_disk <= listed, f"add {sorted(on_disk - listed)} to [tool.setuptools] packages"


def test_second_process_is_refused_then_ctrl_c_is_one_line_and_resume_continues(tmp_path):
    """A run directory has one writer: a second toylens-train (new run or resume=) gets one line naming the
    holder's pid; Ctrl-C ends the holder with one line and exit 130; then resume= works."""
    run = tmp_path / "run"
    args = ["experiment=no_pos_prev_token", *TINY, "train.batch_size=16", "train.steps=100000",
            "train.checkpoint_every=20", "train.eval_every=1000", "train.stop_at_eval_loss=null"]
    proc = subprocess.Popen([sys.executable, "-m", "toylens.train.cli", *args, f"hydra.run.dir={run}"],
                            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not ck.list_checkpoints(run):
            time.sleep(0.05)
        assert ck.list_checkpoints(run), "the run never checkpointed"
        for extra in ([*args, f"hydra.run.dir={run}"], [f"resume={run}"]):
            p = run_cli(extra, cwd=tmp_path)
            lines = p.stderr.strip().splitlines()
            assert p.returncode == 2 and len(lines) == 1 and f"in use by process {proc.pid}" in lines[0], p.stderr
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130 and "Traceback" not in err, err
    last = ck.list_checkpoints(run)[-1]
    assert lines[-1].startswith("toylens-train: error: interrupted at step ")
    assert lines[-1].endswith(f"the last checkpoint is step {last}; continue with toylens-train resume={run}")
    p = run_cli([f"resume={run}", f"train.steps={last + 10}"], cwd=tmp_path)
    assert p.returncode == 0 and ck.list_checkpoints(run)[-1] == last + 10, p.stderr
    assert "stopped at step" not in p.stderr and f"toylens: step {last + 10}, eval/loss" in p.stderr


@pytest.mark.parametrize("args,field", [(["-m", "task=nonexistent_task,icl"], "task=nonexistent_task"),
                                        (["-m", "seed=0,1", "+model.d_modle=3"], "model.d_modle"),
                                        (["-m", "optim.lr=inf,0.1"], "optim.lr")])
def test_multirun_command_line_is_checked_before_any_job(tmp_path, monkeypatch, capsys, args, field):
    monkeypatch.chdir(tmp_path)
    code, out, err = _main_in_process(monkeypatch, capsys, args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and field in lines[0] and "_schema" not in err, err
    assert _everything(tmp_path) == []
