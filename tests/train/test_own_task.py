"""The user's own task through every door: a file outside the repository and an installed plugin, trained with
toylens-train, then analysed, loaded, resumed and swept in fresh processes from another working directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PARITY = textwrap.dedent('''
    """Parity of n bits: [BOS, b1..bn, =] -> the parity at '='."""
    from dataclasses import dataclass

    import torch

    from toylens.data import Batch, Task, TaskConfig


    @dataclass
    class ParityConfig(TaskConfig):
        name: str = "parity"
        n_bits: int = 6  # bits per sequence


    class Parity(Task):
        name = "parity"
        config_cls = ParityConfig

        @property
        def d_vocab(self):
            return 4  # 0, 1, BOS, =

        @property
        def seq_len(self):
            return self.cfg.n_bits + 2

        @property
        def token_names(self):
            return ["0", "1", "BOS", "="]

        def sample(self, batch_size, generator):
            dev = generator.device
            bits = torch.randint(0, 2, (batch_size, self.cfg.n_bits), generator=generator, device=dev)
            tokens = torch.cat([torch.full((batch_size, 1), 2, device=dev), bits,
                                torch.full((batch_size, 1), 3, device=dev)], 1)
            targets = torch.zeros_like(tokens)
            targets[:, -1] = bits.sum(1) % 2
            mask = torch.zeros_like(tokens, dtype=torch.bool)
            mask[:, -1] = True
            return Batch(tokens, targets, mask)

        def corrupt(self, batch, generator):
            tokens, targets = batch.tokens.clone(), batch.targets.clone()
            tokens[:, 1] = 1 - tokens[:, 1]  # flip the first bit: the answer flips
            targets[:, -1] = 1 - targets[:, -1]
            return Batch(tokens, targets, batch.loss_mask)


    class ParityNoPairs(Parity):
        corrupt = Task.corrupt  # offers no clean/corrupted pairs
''')
SMALL = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.d_head=16", "model.d_mlp=64",
         "train.steps=20", "train.checkpoint_every=10", "train.eval_every=10", "train.eval_size=64",
         "train.batch_size=32", "train.progress=false", "device=cpu"]


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", HYDRA_FULL_ERROR="0", **extra)
    env.pop("WANDB_API_KEY", None)
    return env


def _run(module: str, args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=_env(**env), capture_output=True,
                          text=True, timeout=300)


def _python(code: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=_env(**env), capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A parity task in a file outside the repo, trained by the CLI from that file's folder."""
    root = tmp_path_factory.mktemp("own")
    (root / "mine").mkdir()
    (root / "mine" / "parity_task.py").write_text(PARITY)
    (root / "elsewhere").mkdir()
    p = _run("toylens.train.cli", ["task=parity_task.py:Parity", "task.n_bits=5", *SMALL,
                                   f"checkpoint_root={root / 'ck'}"], cwd=root / "mine")
    assert p.returncode == 0, p.stderr
    return root, Path(p.stdout.strip().splitlines()[-1])


def test_a_file_task_run_records_its_source(world):
    root, run = world
    rec = json.loads((run / "task_source.json").read_text())
    src = root / "mine" / "parity_task.py"
    assert rec["kind"] == "file" and rec["path"] == str(src) and rec["name"] == f"{src}:Parity"
    import hashlib

    assert rec["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert (run / "task_source.py").read_bytes() == src.read_bytes()
    cfg = (run / ".hydra" / "config.yaml").read_text()
    assert f"name: {src}:Parity" in cfg and "n_bits: 5" in cfg


def test_analyze_load_run_and_resume_from_another_directory_in_fresh_processes(world):
    root, run = world
    away = root / "elsewhere"
    p = _run("toylens.report.cli", [f"run={run}", "analyses=[attention,patching,tracing,discovery]",
                                    "batch.size=64", "reference.size=64", "pairs.n=8", "tracing.prompts=2",
                                    "progress=false", "device=cpu"], cwd=away)
    assert p.returncode == 0, p.stderr
    data = json.loads((run / "report" / "report.json").read_text())
    ids = [s["id"] for s in data["sections"]]
    assert {"patching", "tracing", "discovery"} <= set(ids), ids  # the task offers corrupt(): pairs exist
    assert not data["errors"], data["errors"]
    code = (f"import toylens; r = toylens.load_run({str(run)!r}); b = r.batch(4); "
            f"print(type(r.task).__name__, r.task.cfg.n_bits, r.task.seq_len, tuple(b.tokens.shape), "
            f"r.model().cfg.d_vocab)")
    p = _python(code, cwd=away)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["Parity", "5", "7", "(4,", "7)", "4"]
    p = _run("toylens.train.cli", [f"resume={run}", "train.steps=30", "train.progress=false"], cwd=away)
    assert p.returncode == 0, p.stderr
    from toylens.runs import checkpoint as ck

    assert ck.list_checkpoints(run)[-1] == 30


def test_a_sweep_over_the_task_setting_and_its_report_from_another_directory(world):
    root, _ = world
    sweep_root = root / "sweep"
    p = _run("toylens.train.cli", ["-m", "task=parity_task.py:Parity", "task.n_bits=3,4", *SMALL,
                                   f"checkpoint_root={sweep_root}"], cwd=root / "mine")
    assert p.returncode == 0, p.stderr
    sweep = next((sweep_root / "default" / "multirun").iterdir())
    index = json.loads((sweep / "sweep.json").read_text())
    assert [r["status"] for r in index["runs"]] == ["finished", "finished"]
    code = ("import toylens, sys; print(*[toylens.load_run(d).task.cfg.n_bits for d in sys.argv[1:]])")
    p = subprocess.run([sys.executable, "-c", code, str(sweep / "0"), str(sweep / "1")], cwd=root / "elsewhere",
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["3", "4"]
    src = f"{root / 'mine' / 'parity_task.py'}:Parity"  # canonical and unescaped (not "parity_task.py\\:Parity")
    assert [r["params"]["task"] for r in index["runs"]] == [src, src] and index["overrides"][0] == f"task={src}"
    import shutil

    shutil.rmtree(sweep / "1")  # finish the sweep from another directory, naming the file by its absolute path
    p = _run("toylens.train.cli", ["-m", f"task={src}", "task.n_bits=3,4", *SMALL, f"checkpoint_root={sweep_root}",
                                   f"hydra.sweep.dir={sweep}"], cwd=root / "elsewhere")
    assert p.returncode == 0, p.stderr
    assert "already finished (step 20): skipped" in p.stderr
    index = json.loads((sweep / "sweep.json").read_text())
    assert [r["status"] for r in index["runs"]] == ["finished", "finished"]
    assert [r["params"]["task"] for r in index["runs"]] == [src, src]


def test_a_gone_file_names_the_saved_copy_and_a_changed_one_warns_with_both_hashes(world, tmp_path):
    import shutil

    import toylens
    from toylens.runs.run import RunError
    from toylens.runs.task_source import TaskSourceChanged

    root, run = world
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    rec = json.loads((copy / "task_source.json").read_text())
    moved = tmp_path / "parity_task.py"
    shutil.copy(rec["path"], moved)
    rec.update(path=str(tmp_path / "gone.py"))
    (copy / "task_source.json").write_text(json.dumps(rec))
    with pytest.raises(RunError) as e:
        toylens.load_run(copy)
    msg = str(e.value)
    assert "is gone" in msg and f"task_source={copy / 'task_source.py'}" in msg and "\n" not in msg
    assert toylens.load_run(copy, task_source=copy / "task_source.py").task.cfg.n_bits == 5
    moved.write_text(PARITY + "\n# edited\n")
    rec.update(path=str(moved))
    (copy / "task_source.json").write_text(json.dumps(rec))
    with pytest.warns(TaskSourceChanged, match=rf"was {rec['sha256'][:12]}, now [0-9a-f]{{12}}"):
        assert toylens.load_run(copy).task.seq_len == 7
    away = tmp_path / "away"
    away.mkdir()
    p = _run("toylens.train.cli", [f"resume={copy}", "train.steps=30", "train.progress=false"], cwd=away)
    assert p.returncode == 0, p.stderr
    warned = [ln for ln in p.stderr.splitlines() if "changed since the run" in ln]
    assert len(warned) == 1 and warned[0].startswith("toylens-train: warning: task "), p.stderr  # once, not twice


def test_a_task_without_corrupt_leaves_interventions_out_with_a_reason(world, tmp_path):
    from toylens.report.build import build_report
    from toylens.report.config import AnalyzeConfig, BatchConfig
    from toylens.runs.config import LoopConfig, ModelConfig, TrainConfig
    from toylens.runs.run import load_run
    from toylens.train.loop import train

    root, _ = world
    cfg = TrainConfig(name="nopairs", checkpoint_root=str(tmp_path), device="cpu",
                      task=f"{root / 'mine' / 'parity_task.py'}:ParityNoPairs",
                      model=ModelConfig(n_layers=1, d_model=32, n_heads=2, d_head=16, d_mlp=64),
                      train=LoopConfig(batch_size=16, steps=10, eval_every=10, eval_size=32, checkpoint_every=10,
                                       progress=False))
    res = train(cfg)
    run = load_run(res.run_dir)
    report = build_report(run, AnalyzeConfig(run=str(res.run_dir), analyses=["attention", "patching", "tracing",
                                                                               "discovery"], batch=BatchConfig(size=32),
                                             progress=False, device="cpu"))
    left = {d["analysis"]: d["reason"] for d in report.data["left_out"]}
    assert set(left) == {"patching", "tracing", "discovery"}
    assert all("corrupt" in r for r in left.values()), left
    assert [s.id for s in report.sections if s.id in ("patching", "tracing", "discovery")] == []


def test_an_installed_plugin_task_through_every_door(tmp_path):
    """A package declaring its task under the entry-point group toylens.tasks: swept, reloaded, analysed and
    resumed by name in fresh processes from other directories; uninstalled, one line names it."""
    site = tmp_path / "site"
    (site / "parity_pkg").mkdir(parents=True)
    (site / "parity_pkg" / "__init__.py").write_text(PARITY)
    info = site / "parity_pkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: parity-pkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[toylens.tasks]\nparity = parity_pkg:Parity\n")
    p = _run("toylens.train.cli", ["-m", "task=parity", "task.n_bits=3,4", *SMALL,
                                   f"checkpoint_root={tmp_path / 'ck'}"], cwd=tmp_path, PYTHONPATH=str(site))
    assert p.returncode == 0, p.stderr
    sweep = next((tmp_path / "ck" / "default" / "multirun").iterdir())
    run = sweep / "1"
    rec = json.loads((run / "task_source.json").read_text())
    assert (rec["kind"], rec["name"], rec["dist"]) == ("entry_point", "parity", "parity-pkg==0.1")
    code = f"import toylens; r = toylens.load_run({str(run)!r}); print(type(r.task).__module__, r.task.seq_len)"
    p = _python(code, cwd=run, PYTHONPATH=str(site))
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["parity_pkg", "6"]
    p = _run("toylens.report.cli", [f"run={run}", "analyses=[attention,patching]", "batch.size=32", "pairs.n=8",
                                    "progress=false", "device=cpu"], cwd=site, PYTHONPATH=str(site))
    assert p.returncode == 0, p.stderr
    assert [s["id"] for s in json.loads((run / "report" / "report.json").read_text())["sections"]][-2:] == \
        ["attention", "patching"]
    p = _run("toylens.train.cli", [f"resume={run}", "train.steps=30", "train.progress=false"], cwd=site,
             PYTHONPATH=str(site))
    assert p.returncode == 0, p.stderr
    p = _python(code, cwd=run)  # the package uninstalled: one line naming it and the saved copy
    assert p.returncode == 1 and "parity-pkg==0.1" in p.stderr and "task_source=" in p.stderr


def test_a_task_registered_from_the_users_module_reloads_in_a_fresh_process(tmp_path, monkeypatch):
    """The notebook way: ``import parity_mod`` (it registers its class), then ``train(TrainConfig(task="parity_mod"))``
    in Python; the run reloads elsewhere although that module is not importable there."""
    from toylens.data import TASKS
    from toylens.runs.config import LoopConfig, ModelConfig, TrainConfig
    from toylens.train.loop import train

    src = PARITY.replace("class Parity(Task):\n    name = \"parity\"",
                         "@register_task\nclass Parity(Task):\n    name = \"parity_mod\"")
    src = src.replace("from toylens.data import Batch, Task, TaskConfig",
                      "from toylens.data import Batch, Task, TaskConfig, register_task")
    (tmp_path / "parity_mod.py").write_text(src)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import parity_mod  # noqa: F401

        cfg = TrainConfig(name="mod", checkpoint_root=str(tmp_path / "ck"), device="cpu", task="parity_mod",
                          model=ModelConfig(n_layers=1, d_model=32, n_heads=2, d_head=16, d_mlp=64),
                          train=LoopConfig(batch_size=16, steps=10, eval_every=10, eval_size=32, checkpoint_every=10,
                                           progress=False))
        run = train(cfg).run_dir
    finally:
        TASKS.pop("parity_mod", None)
        sys.modules.pop("parity_mod", None)
    rec = json.loads((run / "task_source.json").read_text())
    assert (rec["kind"], rec["name"], rec["module"]) == ("module", "parity_mod", "parity_mod")
    away = tmp_path / "away"
    away.mkdir()
    p = _python(f"import toylens; r = toylens.load_run({str(run)!r}); print(r.task.name, r.task.seq_len)", cwd=away)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["parity_mod", "8"]
