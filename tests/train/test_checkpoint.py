"""Checkpoint I/O: round trip, atomicity, pruning, and refusing bad files with one-line errors."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from toylens.model.build import build_model
from toylens.runs import checkpoint as ck
from toylens.runs.config import ModelConfig


class Evil:  # a state file holding this would need to unpickle code
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _model():
    return build_model(ModelConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32,
                                   positional_embedding_type="none"), d_vocab=11, n_ctx=8, seed=0)


def test_round_trip_weights_and_state(tmp_path):
    model = _model()
    gen = torch.Generator().manual_seed(5)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.randint(0, 11, (2, 8))).sum().backward()
    opt.step()
    ck.save_checkpoint(tmp_path, 7, model, {"optimizer": opt.state_dict(), "rng": ck.rng_state(gen)})
    assert ck.list_checkpoints(tmp_path) == [7]
    weights = ck.load_weights(tmp_path, 7)
    for k, v in model.state_dict().items():
        assert torch.equal(weights[k], v), k
    state = ck.load_state(tmp_path, 7)  # weights_only=True inside
    assert state["step"] == 7
    expected = torch.rand(3, generator=gen)
    gen2 = torch.Generator()
    ck.set_rng_state(state["rng"], gen2)
    assert torch.equal(torch.rand(3, generator=gen2), expected)


def test_rng_state_restores_every_generator():
    import random

    import numpy as np

    state = ck.rng_state()
    a = (torch.rand(2), random.random(), np.random.rand())
    ck.set_rng_state(state)
    b = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_prune_keeps_the_newest(tmp_path):
    model = _model()
    for step in (10, 20, 30, 40):
        ck.save_checkpoint(tmp_path, step, model, {})
    assert ck.prune_checkpoints(tmp_path, 2) == [10, 20]
    assert ck.list_checkpoints(tmp_path) == [30, 40]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "step_000030.safetensors", "step_000030.state.pt", "step_000040.safetensors", "step_000040.state.pt"]


def test_truncated_weights_give_one_line_error(tmp_path):
    ck.save_checkpoint(tmp_path, 1, _model(), {})
    path = ck.weights_path(tmp_path, 1)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_weights(tmp_path, 1)
    assert "\n" not in str(e.value) and "step_000001.safetensors" in str(e.value)


def test_state_needing_code_is_refused(tmp_path):
    ck.save_checkpoint(tmp_path, 1, _model(), {})
    ck.state_path(tmp_path, 1).write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(ck.CheckpointError, match="weights_only"):
        ck.load_state(tmp_path, 1)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    ck.write_text(target, "old")

    def boom(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        ck.atomic_write(target, boom)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_metrics_truncate_and_tolerate_a_cut_last_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 5}\n{"step": 10}\n{"step": 15}\n{"st')
    assert [r["step"] for r in ck.read_metrics(tmp_path)] == [5, 10, 15]
    ck.truncate_metrics(tmp_path, 10)
    assert [r["step"] for r in ck.read_metrics(tmp_path)] == [5, 10]


def test_written_files_get_ordinary_permissions(tmp_path):
    ck.save_checkpoint(tmp_path, 1, _model(), {})
    umask = os.umask(0)
    os.umask(umask)
    assert (ck.weights_path(tmp_path, 1).stat().st_mode & 0o777) == 0o666 & ~umask
