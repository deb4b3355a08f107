"""toylens-sae end to end on a tiny run: the SAE folder (SAELens's files, toylens's numbers, the page) and its numbers
read back; bad input is one line, exit 2 and nothing written; a foreign sae/<hook> folder is never replaced."""

from __future__ import annotations

import json
import sys

import pytest
import torch

pytest.importorskip("sae_lens")

from toylens.report import sae_cli  # noqa: E402

HOOK = "blocks.0.hook_mlp_out"
FAST = ["d_sae=32", "steps=30", "batch_tokens=256", "eval_sequences=32", "cards=2", "log_every=10"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_run):
    return tiny_run(tmp_path_factory.mktemp("sae_cli") / "run")


def call(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["toylens-sae", *args])
    code = 0
    try:
        sae_cli.main()
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_trains_evaluates_and_writes_the_sae_folder(run_dir, monkeypatch, capsys):
    code, out, err = call(monkeypatch, capsys, f"run={run_dir}", f"hook={HOOK}", *FAST)
    assert code == 0, err
    folder = run_dir / "sae" / HOOK
    assert out.strip() == str(folder / "report" / "index.html")
    assert {"cfg.json", "sae_weights.safetensors", "runner_cfg.json", "toylens_sae.json", ".toylens-sae",
            "report"} <= {p.name for p in folder.iterdir()}
    assert sorted(p.name for p in (run_dir / "sae").iterdir()) == [HOOK]  # nothing else, no temporary folders
    data = json.loads((folder / "toylens_sae.json").read_text())
    ev = data["eval"]
    assert data["settings"]["d_sae"] == 32 and data["curves"]["step"][-1] == 30 and len(data["density"]) == 32
    page = (folder / "report" / "index.html").read_text()
    assert "Made by toylens-sae" in page and "toylens-analyze" not in page
    assert "CE loss recovered" in page and f"{ev['ce_loss_recovered']:.3f}" in page and f"L0 {ev['l0']:.1f}" in page
    assert f"CE loss recovered {ev['ce_loss_recovered']:.3f}" in err  # the headline on stderr too

    # the SAE on disk (SAELens's own format) reproduces the numbers written beside it
    from toylens.analyze.sae import evaluate_sae, load_sae
    from toylens.analyze.sae.pipeline import EVAL_SEED
    from toylens.runs.run import load_run

    run = load_run(run_dir)
    sae = load_sae(folder)
    with torch.no_grad():
        again = evaluate_sae(run.model(), sae, HOOK, run.task.eval_set(32, EVAL_SEED, "cpu"))
    assert again.ce_loss_recovered == pytest.approx(ev["ce_loss_recovered"], abs=1e-5)
    assert again.l0 == pytest.approx(ev["l0"], abs=1e-5)
    assert again.explained_variance == pytest.approx(ev["explained_variance"], abs=1e-5)
    ce = (ev["ce_zero_ablation"] - ev["ce_spliced"]) / (ev["ce_zero_ablation"] - ev["ce_clean"])
    assert ev["ce_loss_recovered"] == pytest.approx(ce, abs=1e-9)

    # a rerun replaces its own folder
    code, _, err = call(monkeypatch, capsys, f"run={run_dir}", f"hook={HOOK}", *FAST[:-1], "log_every=15")
    assert code == 0, err
    assert json.loads((folder / "toylens_sae.json").read_text())["settings"]["log_every"] == 15


@pytest.mark.parametrize("args, needles", [
    (["hook=blocks.0.hook_nope"], ["hook=blocks.0.hook_nope", "choose one of", HOOK, "blocks.1.hook_resid_post"]),
    ([f"hook={HOOK}", "d_sae=0"], ["d_sae=0", "positive"]),
    ([f"hook={HOOK}", "l1=-1"], ["l1=-1", ">= 0"]),
    ([f"hook={HOOK}", "steps=ten"], ["steps=ten", "integer"]),
    ([f"hook={HOOK}", "dsae=8"], ["dsae", "did you mean d_sae"]),
    ([], ["hook is required"]),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, tiny_run, monkeypatch, capsys, args, needles):
    run_dir = tiny_run(tmp_path / "run")
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    code, out, err = call(monkeypatch, capsys, f"run={run_dir}", *args)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert all(n in err for n in needles), err
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before


def test_missing_run_and_a_foreign_folder(tmp_path, tiny_run, monkeypatch, capsys):
    code, _, err = call(monkeypatch, capsys, f"run={tmp_path / 'missing'}", f"hook={HOOK}")
    assert code == 2 and "no such directory" in err and "run=" in err and not (tmp_path / "missing").exists()
    run_dir = tiny_run(tmp_path / "run")
    mine = run_dir / "sae" / HOOK
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("my own SAE")
    code, _, err = call(monkeypatch, capsys, f"run={run_dir}", f"hook={HOOK}", *FAST)
    assert code == 2 and "toylens did not write it" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "my own SAE"


def test_logs_to_the_runs_wandb_run_offline(tmp_path, tiny_run, monkeypatch, capsys):
    run_dir = tiny_run(tmp_path / "run", **{"logger.name": "wandb", "logger.mode": "offline",
                                            "logger.project": "toylens-test"})
    before = set((run_dir / "wandb").glob("offline-run-*/*.wandb"))
    code, _, err = call(monkeypatch, capsys, f"run={run_dir}", f"hook={HOOK}", *FAST)
    assert code == 0, err
    from toylens.runs.run import load_run

    wandb_id = load_run(run_dir).wandb_id()
    logged = [p for p in (run_dir / "wandb").glob("offline-run-*/*.wandb") if p not in before]
    assert logged and all(wandb_id in p.name for p in logged)  # the training's own run, resumed
    blob = b"".join(p.read_bytes() for p in logged)
    assert f"sae/{HOOK}/eval/ce_loss_recovered".encode() in blob and f"sae/{HOOK}/curves".encode() in blob
