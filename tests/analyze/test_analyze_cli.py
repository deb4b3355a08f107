"""``toylens-analyze``: Hydra composition, exit codes, one-line errors, nothing left behind.

Most cases call ``main()`` in-process (Hydra allows repeated calls) to stay fast; one runs the
installed entry point in a subprocess, as a user does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from toylens.report import cli
from toylens.runs import checkpoint as ck

SMALL = ["batch.size=32", "reference.size=24", "progress=false", "device=cpu", "max_tokens=6", "chunk_size=16",
         "ablation.chunk_rows=16"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_run) -> Path:
    return tiny_run(tmp_path_factory.mktemp("runs") / "tiny", **{"model.n_heads": 1, "model.d_head": 32})


@pytest.fixture
def cwd(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cwd"
    d.mkdir()
    monkeypatch.chdir(d)
    return d


def call(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["toylens-analyze", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def _tree(d: Path) -> list:
    return sorted((str(p.relative_to(d)), p.stat().st_mtime_ns) for p in d.rglob("*"))


def _assert_one_line(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("toylens-analyze: error: "), err
    for n in needles:
        assert n in lines[0], err


def test_report_of_a_run(trained, cwd, monkeypatch, capsys):
    run_dir = Path(shutil.copytree(trained, cwd.parent / "run"))
    code, out, err = call(monkeypatch, capsys, f"run={run_dir}", *SMALL, "analyses=[attention,neurons,ablation]",
                          "ablation.modes=[mean,zero]", "step=10")
    assert code == 0, err
    index = run_dir / "report" / "index.html"
    assert out.strip().splitlines()[-1] == str(index)
    data = json.loads((run_dir / "report" / "report.json").read_text())
    assert data["run"]["step"] == 10 and data["settings"]["ablation"]["modes"] == ["mean", "zero"]
    assert {r["mode"] for r in data["ablation"]["rows"]} == {"mean", "zero"}
    assert data["settings"]["batch"]["size"] == 32 and data["ablation"]["n_reference_rows"] == 24
    assert {"attention", "neurons", "ablation"} <= set(data) and "circuits" not in data
    assert (run_dir / "report" / "ablation.csv").is_file()
    assert list(cwd.iterdir()) == []  # Hydra wrote nothing (no outputs/, no .hydra/, no log file)
    assert not (run_dir / "report" / ".hydra").exists()


def test_relative_run_path_and_rerun_replaces_the_report(trained, cwd, monkeypatch, capsys):
    shutil.copytree(trained, cwd / "run")
    code, out, err = call(monkeypatch, capsys, "run=run", *SMALL, "analyses=[attention]")
    assert code == 0, err
    first = (cwd / "run" / "report" / "report.json").read_text()
    code, out, err = call(monkeypatch, capsys, "run=run", *SMALL, "analyses=[dla]")
    assert code == 0, err
    second = json.loads((cwd / "run" / "report" / "report.json").read_text())
    assert "dla" in second and "attention" not in second and first != json.dumps(second)
    assert sorted(p.name for p in (cwd / "run").iterdir() if p.name.startswith(".report")) == []


@pytest.mark.parametrize("args,code,needles", [
    ([], 2, ["run is required", "run=<"]),
    (["run={tmp}/nowhere"], 2, ["no such directory"]),
    (["run={tmp}"], 2, ["not a toylens run directory"]),
    (["run={run}", "analyses=[attention,ablaton]"], 2, ["'ablaton' is not an analysis", "choose from"]),
    (["run={run}", "batch.size=0"], 2, ["batch.size=0 must be positive"]),
    (["run={run}", "reference.size=-1"], 2, ["reference.size=-1"]),
    (["run={run}", "ablation.modes=[average]"], 2, ["ablation.modes=['average']"]),
    (["run={run}", "step=15"], 2, ["step=15", "[10, 20]"]),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(trained, cwd, monkeypatch, capsys, args, code, needles):
    args = [a.format(tmp=cwd.parent, run=trained) for a in args]
    run_before, cwd_before = _tree(trained), _tree(cwd.parent)
    got, out, err = call(monkeypatch, capsys, *args)
    assert got == code
    _assert_one_line(err, *needles)
    assert out == ""
    assert _tree(trained) == run_before and _tree(cwd.parent) == cwd_before
    assert not (cwd.parent / "nowhere").exists()


def test_typo_fails_at_composition(trained, cwd, monkeypatch, capsys):
    got, out, err = call(monkeypatch, capsys, f"run={trained}", "batch.sise=3")
    assert got != 0 and "batch.sise" in err
    got, out, err = call(monkeypatch, capsys, f"run={trained}", "batch.size=many")
    assert got != 0 and "batch.size" in err
    assert list(cwd.iterdir()) == []


def test_corrupted_checkpoint_exits_1_with_one_line(trained, cwd, monkeypatch, capsys):
    run_dir = Path(shutil.copytree(trained, cwd.parent / "run"))
    w = ck.weights_path(run_dir, 20)
    w.write_bytes(w.read_bytes()[:100])
    before = _tree(run_dir)
    got, out, err = call(monkeypatch, capsys, f"run={run_dir}", *SMALL)
    assert got == 1
    _assert_one_line(err, "step_000020.safetensors", "truncated or corrupted")
    assert _tree(run_dir) == before and not (run_dir / "report").exists()


def test_entry_point_in_a_subprocess(trained, tmp_path):
    """The installed console script, as a user types it: a bad path exits 2 with one line, fast."""
    exe = Path(sys.executable).parent / "toylens-analyze"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "toylens.report.cli"]
    env = dict(os.environ, WANDB_MODE="offline", HYDRA_FULL_ERROR="0")
    p = subprocess.run([*cmd, f"run={tmp_path / 'missing'}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2, p.stderr
    _assert_one_line(p.stderr, "no such directory")
    assert list(tmp_path.iterdir()) == []
