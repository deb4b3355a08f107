"""toylens.load_run: reading a run directory back, and refusing broken ones with one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import toylens
import toylens.analyze
from toylens.model.build import positional_embedding_type
from toylens.runs import checkpoint as ck
from toylens.runs.checkpoint import CheckpointError
from toylens.runs.run import Run, RunError, load_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_run) -> Path:
    return tiny_run(tmp_path_factory.mktemp("runs") / "tiny")


@pytest.fixture
def copy(trained, tmp_path) -> Path:
    """A private copy of the trained run, free to break."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*")}


def test_load_run_reads_config_task_metrics_and_steps(trained):
    run = toylens.load_run(trained)
    assert isinstance(run, Run) and run.path == trained.resolve()
    assert run.config.name == "tiny" and run.config.model.d_model == 32
    assert run.task.d_vocab == 20 and run.task.seq_len == 12
    assert run.steps == ck.list_checkpoints(trained) == [10, 20] and run.last_step == 20
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert run.metrics == rows and [r["step"] for r in rows] == [5, 10, 15, 20]
    assert run.positional_embedding_type == "none"
    assert run.name == f"tiny/{trained.name}"
    assert run.wandb_id() is None  # logger none


def test_model_is_the_saved_checkpoint_with_positional_none(trained):
    run = load_run(trained)
    model = run.model()
    saved = load_file(str(ck.weights_path(trained, 20)))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert positional_embedding_type(model) == "none"
    assert torch.count_nonzero(model.W_pos) == 0 and not model.W_pos.requires_grad
    assert not model.training
    # the model computes what training measured: the logged eval/loss on the fixed held-out set
    batch = run.task.eval_set(run.config.train.eval_size, run.config.train.eval_seed)
    with torch.no_grad():
        logits = model(batch.tokens)
    loss = F.cross_entropy(logits[batch.loss_mask], batch.targets[batch.loss_mask]).item()
    assert loss == pytest.approx(run.metrics[-1]["eval/loss"], rel=1e-4)
    earlier = run.model(step=10)
    assert not torch.equal(earlier.W_E, model.W_E)
    assert torch.equal(earlier.W_E, load_file(str(ck.weights_path(trained, 10)))["embed.W_E"])


def test_folded_model_is_checked_and_keeps_w_pos_zero(trained):
    run = load_run(trained)
    model, folded = run.model(), run.model(folded=True)
    assert folded.cfg.normalization_type == "LNPre" and model.cfg.normalization_type == "LN"
    assert torch.count_nonzero(folded.W_pos) == 0 and positional_embedding_type(folded) == "none"
    tokens = run.batch(32, seed=5).tokens
    with torch.no_grad():
        diff = (model(tokens).log_softmax(-1) - folded(tokens).log_softmax(-1)).abs().max().item()
    assert diff < 1e-4


def test_batches_are_seeded_and_distinct(trained):
    run = load_run(trained)
    a, b, c = run.batch(16, seed=1), run.batch(16, seed=1), run.batch(16, seed=2)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    assert a.tokens.shape == (16, 12) and bool((a.tokens[:, 0] == 0).all())  # BOS first


def test_unknown_step_names_the_available_ones(trained):
    run = load_run(trained)
    with pytest.raises(RunError, match=r"step=15: .*\[10, 20\]"):
        run.model(step=15)


def _one_line_error(exc_info, *needles):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_wrong_paths(tmp_path):
    with pytest.raises(RunError) as e:
        load_run(tmp_path / "nope")
    _one_line_error(e, "no such directory", "run=")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(RunError) as e:
        load_run(tmp_path / "file.txt")
    _one_line_error(e, "not a run directory")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError) as e:
        load_run(tmp_path / "empty")
    _one_line_error(e, "not a toylens run directory", ".hydra/config.yaml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file.txt"]
    assert not any((tmp_path / "empty").iterdir())


def test_run_without_checkpoints(copy):
    shutil.rmtree(copy / "ckpt")
    before = _snapshot(copy)
    with pytest.raises(RunError) as e:
        load_run(copy)
    _one_line_error(e, "no checkpoints", "checkpoint at step 10")
    assert _snapshot(copy) == before


@pytest.mark.parametrize("damage,needles", [
    ("missing", ["model_config.json: missing"]),
    ("garbled", ["not valid JSON"]),
    ("not_object", ["expected a JSON object"]),
    ("bad_size", ["d_model=-3"]),
])
def test_broken_model_config(copy, damage, needles):
    path = copy / "model_config.json"
    if damage == "missing":
        path.unlink()
    elif damage == "garbled":
        path.write_text(path.read_text()[:40])
    elif damage == "not_object":
        path.write_text("[1, 2, 3]")
    else:
        d = json.loads(path.read_text())
        d["d_model"] = -3
        path.write_text(json.dumps(d))
    before = _snapshot(copy)
    with pytest.raises(RunError) as e:
        load_run(copy)
    _one_line_error(e, *needles)
    assert _snapshot(copy) == before


def test_model_config_that_cannot_build_a_model(copy):
    path = copy / "model_config.json"
    d = json.loads(path.read_text())
    d["no_such_field"] = 1
    path.write_text(json.dumps(d))
    run = load_run(copy)  # the JSON itself is fine
    with pytest.raises(RunError) as e:
        run.model()
    _one_line_error(e, "cannot build a HookedTransformer", "no_such_field")


def test_truncated_weights(copy):
    w = ck.weights_path(copy, 20)
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    run = load_run(copy)
    before = _snapshot(copy)
    with pytest.raises(CheckpointError) as e:
        run.model()
    _one_line_error(e, "step_000020.safetensors", "truncated or corrupted")
    assert _snapshot(copy) == before
    assert run.model(step=10) is not None  # the other checkpoint still loads


@pytest.mark.parametrize("tamper,needle", [
    ("reshape", "do not fit model_config.json"),
    ("drop", "do not fit model_config.json"),
    ("nan", "NaN or inf"),
    ("w_pos", "W_pos is not zero"),
])
def test_tampered_weights(copy, tamper, needle):
    w = ck.weights_path(copy, 20)
    tensors = load_file(str(w))
    if tamper == "reshape":
        tensors["embed.W_E"] = tensors["embed.W_E"][:-1]
    elif tamper == "drop":
        del tensors["unembed.W_U"]
    elif tamper == "nan":
        tensors["blocks.0.attn.W_Q"][0, 0, 0] = float("nan")
    else:
        tensors["pos_embed.W_pos"] = torch.ones_like(tensors["pos_embed.W_pos"])
    save_file(tensors, str(w))
    state = ck.load_state(copy, 20)  # tamper consistently (drop the checksum) to reach the deeper checks
    del state["weights_sha256"]
    torch.save(state, ck.state_path(copy, 20))
    with pytest.raises(CheckpointError) as e:
        load_run(copy).model()
    _one_line_error(e, needle, str(w))


class _Evil:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_state_file_that_needs_unpickling_code_is_refused(copy, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"step": 20, "wandb_id": "abc", "payload": _Evil(str(marker))}, ck.state_path(copy, 20))
    run = load_run(copy)
    with pytest.raises(CheckpointError) as e:
        run.state()
    _one_line_error(e, "step_000020.state.pt", "weights_only")
    assert not marker.exists()
    # a run that logged to wandb reads its id from that state file: refused the same way
    cfg = copy / ".hydra" / "config.yaml"
    cfg.write_text(cfg.read_text().replace("name: none", "name: wandb"))
    with pytest.raises(CheckpointError, match="weights_only"):
        load_run(copy).wandb_id()
    assert not marker.exists()


def test_garbled_training_config(copy):
    cfg = copy / ".hydra" / "config.yaml"
    cfg.write_text("name: [unclosed\n")
    with pytest.raises(RunError) as e:
        load_run(copy)
    _one_line_error(e, "config.yaml", "not a readable config")
    cfg.write_text("name: x\ntask:\n  name: no_such_task\n")
    with pytest.raises(RunError) as e:
        load_run(copy)
    _one_line_error(e, "no_such_task")


def test_package_imports_stay_light_and_fold_is_callable(trained):
    code = ("import sys, toylens, toylens.analyze; "
            "assert 'torch' not in sys.modules and 'transformer_lens' not in sys.modules, sorted(sys.modules); "
            "assert callable(toylens.load_run)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(Path(toylens.__file__).parents[1])))
    assert p.returncode == 0, p.stderr
    from toylens.model.fold import FoldResult

    run = load_run(trained)
    res = toylens.analyze.fold(run.model(), run.batch(8))
    assert isinstance(res, FoldResult) and res.passed
    scores = toylens.analyze.circuits(res.model).copying_score
    assert scores.shape == (2, 2)
    for name in toylens.analyze.__all__:
        assert callable(getattr(toylens.analyze, name)), name
