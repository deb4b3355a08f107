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
import torch

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


def test_relative_run_path_and_a_partial_rerun_keeps_the_earlier_report(trained, cwd, monkeypatch, capsys):
    shutil.copytree(trained, cwd / "run")
    code, out, err = call(monkeypatch, capsys, "run=run", *SMALL, "analyses=[attention]")
    assert code == 0, err
    first = (cwd / "run" / "report" / "report.json").read_text()
    code, out, err = call(monkeypatch, capsys, "run=run", *SMALL, "analyses=[dla]")
    assert code == 0, err
    # the earlier report has a section this one lacks: it stays, the new one goes beside it
    assert (cwd / "run" / "report" / "report.json").read_text() == first
    second = json.loads((cwd / "run" / "report-dla" / "report.json").read_text())
    assert "dla" in second and "attention" not in second
    assert "report-dla instead" in err and "attention" in err
    code, out, err = call(monkeypatch, capsys, "run=run", *SMALL, "analyses=[attention,dla]")
    assert code == 0, err  # a report with every earlier section replaces it
    third = json.loads((cwd / "run" / "report" / "report.json").read_text())
    assert "dla" in third and "attention" in third
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


# --- issue 11: nothing lost, nothing silently wrong, one line where a traceback was ----------------
LONG = " ".join(["1"] * 20)  # 20 tokens (+BOS) > n_ctx 12
CATALOGUE = [
    (["run={run}", "step=last"], ["step='last': expected an int", "step=null"]),
    (["run={run}", "+foo=1"], ["foo is not a setting"]),
    (["run={run}", "batch.sise=3"], ["batch.sise", "batch.size"]),
    (["run={run}", "out={tmp}/elsewhere"], ["out=", "model=pretrained"]),
    (["run={run}", "analyses=[patching]", "pairs.clean=[qq zz]", "pairs.corrupted=[zz qq]", "pairs.answers=[1]",
      "pairs.wrong_answers=[2]"], ["qq"]),
    (["run={run}", "analyses=[patching]", f"pairs.clean=[{LONG}]", f"pairs.corrupted=[{LONG}]",
      "pairs.answers=[1]", "pairs.wrong_answers=[2]"], ["n_ctx"]),
    (["run={run}", "analyses=[patching]", "pairs.clean=[1 2 3]", "pairs.corrupted=[2 3 4]",
      "pairs.answers=[1 2]"], ["wrong_answers"]),
]


@pytest.mark.parametrize("args,needles", CATALOGUE)
def test_catalogue_exits_2_with_one_line_and_writes_nothing(trained, cwd, monkeypatch, capsys, args, needles):
    args = [a.format(tmp=cwd.parent, run=trained) for a in args]
    run_before, cwd_before = _tree(trained), _tree(cwd.parent)
    got, out, err = call(monkeypatch, capsys, *args, *SMALL)
    assert got == 2, err
    assert "Traceback" not in err
    _assert_one_line(err, *needles)
    assert _tree(trained) == run_before and _tree(cwd.parent) == cwd_before


@pytest.mark.parametrize("line,needle", [("42", "not a JSON object"), (b"\xff\xfe{", "not UTF-8")])
def test_bad_metrics_line_is_one_line(trained, cwd, monkeypatch, capsys, line, needle):
    run_dir = Path(shutil.copytree(trained, cwd.parent / "run"))
    m = run_dir / "metrics.jsonl"
    raw = line if isinstance(line, bytes) else line.encode()
    m.write_bytes(raw + b"\n" + m.read_bytes())
    before = _tree(run_dir)
    got, out, err = call(monkeypatch, capsys, f"run={run_dir}", *SMALL)
    assert got == 2
    _assert_one_line(err, "metrics.jsonl", needle)
    assert _tree(run_dir) == before


def test_a_foreign_report_folder_is_never_replaced(trained, cwd, monkeypatch, capsys):
    """out= (pretrained) and a run's report/ only ever replace a report toylens wrote (issue 11, item 1)."""
    run_dir = Path(shutil.copytree(trained, cwd.parent / "run"))
    shutil.rmtree(run_dir / "report", ignore_errors=True)
    (run_dir / "report").mkdir()
    (run_dir / "report" / "notes.txt").write_text("mine")
    got, out, err = call(monkeypatch, capsys, f"run={run_dir}", *SMALL, "analyses=[attention]")
    assert got == 2
    _assert_one_line(err, str(run_dir / "report"), "toylens did not write")
    assert [p.name for p in (run_dir / "report").iterdir()] == ["notes.txt"]
    for kind in ("dir", "file"):
        target = cwd.parent / f"precious-{kind}"
        (target.mkdir() or (target / "thesis.tex").write_text("x")) if kind == "dir" else target.write_text("x")
        before = _tree(cwd.parent)
        got, out, err = call(monkeypatch, capsys, "model=pretrained", "model.name=gpt2", "pairs.clean=[a]",
                             "pairs.corrupted=[b]", "pairs.answers=[c]", "pairs.wrong_answers=[d]", f"out={target}")
        assert got == 2
        _assert_one_line(err, f"out={target}")
        assert _tree(cwd.parent) == before


def test_rerun_replaces_its_own_report_which_carries_the_marker(trained, cwd, monkeypatch, capsys):
    from toylens.report.folder import REPORT_MARKER

    run_dir = Path(shutil.copytree(trained, cwd.parent / "run"))
    for _ in range(2):
        got, out, err = call(monkeypatch, capsys, f"run={run_dir}", *SMALL, "analyses=[attention]")
        assert got == 0, err
        assert (run_dir / "report" / REPORT_MARKER).is_file()


def test_read_only_destination_fails_before_any_analysis(trained, cwd, monkeypatch, capsys):
    import errno

    from toylens.report import build, html

    run_dir = Path(shutil.copytree(trained, cwd.parent / "run"))

    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(html.tempfile, "mkdtemp", refuse)
    monkeypatch.setattr(build, "build_report", lambda *a, **k: pytest.fail("analyses ran before the check"))
    got, out, err = call(monkeypatch, capsys, f"run={run_dir}", *SMALL)
    assert got == 2
    _assert_one_line(err, "Read-only file system")


def test_concurrent_report_writers_take_turns(tmp_path):
    """Eight writers on one folder: every write lands whole, none fails with 'Directory not empty'."""
    from concurrent.futures import ThreadPoolExecutor

    from toylens.report.folder import REPORT_MARKER
    from toylens.report.html import write_report
    from toylens.report.page import Report

    out = tmp_path / "report"

    def write(i):
        return write_report(Report(title=f"r{i}", run_name="x", data={"i": i}), out)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(write, range(8)))
    assert all(r == out / "index.html" for r in results)
    assert json.loads((out / "report.json").read_text())["i"] in range(8) and (out / REPORT_MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no temp or .old folders left


def test_checkpoint_pruned_while_analysing_is_pinned(trained, cwd, monkeypatch, capsys):
    """A run still training may prune the checkpoint analyze chose: it was read into memory first."""
    from toylens.runs.run import load_run

    run_dir = Path(shutil.copytree(trained, cwd.parent / "run"))
    run = load_run(run_dir)
    step = run.pin()
    ck.weights_path(run_dir, step).unlink()  # pruned by the training process
    ck.state_path(run_dir, step).unlink()
    model = run.model(step)
    saved = ck.load_weights(trained, step)
    assert torch.equal(model.W_E.detach(), saved["embed.W_E"])


def test_help_lists_analyze_settings_only(monkeypatch, capsys):
    code, out, err = call(monkeypatch, capsys, "--help")
    assert code == 0 and out.startswith("toylens-analyze: analyse")
    assert "_schema" not in out and "model=           run, pretrained" in out
    assert "batch.size=2000" in out and "experiment=" not in out and "task=" not in out
