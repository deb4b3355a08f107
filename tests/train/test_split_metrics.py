"""A task with a fixed finite training split (modular_add): train and held-out metrics both logged,
each on its own split, and the split identical after a resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from toylens.data import TASKS, make_task
from toylens.model.build import build_model
from toylens.runs import checkpoint as ck
from toylens.runs.config import ModelConfig, TrainConfig
from toylens.train.loop import train


def _cfg(tiny, **kw):
    return tiny(**{
        "model": ModelConfig(n_layers=1, d_model=32, n_heads=2, d_head=16, d_mlp=64, normalization_type=None),
        "task": TASKS["modular_add"].config_cls(p=11, frac_train=0.5, split_seed=2),
        "optim.lr": 1e-2, "optim.weight_decay": 1.0, "train.eval_size": 10**4, **kw,
    })


def _loss_acc(model, batch):
    with torch.no_grad():
        logits = model(batch.tokens)[:, -1]
    y = batch.targets[:, -1]
    return F.cross_entropy(logits, y).item(), (logits.argmax(-1) == y).float().mean().item()


def test_train_and_held_out_metrics_are_each_on_their_split(tiny, tmp_path):
    cfg = _cfg(tiny)
    res = train(cfg, run_dir=tmp_path / "run")
    rows = [r for r in ck.read_metrics(res.run_dir) if "eval/loss" in r]
    assert [r["step"] for r in rows] == [10, 20]
    last = rows[-1]
    task = make_task(cfg.task)
    model = build_model(cfg.model, task.d_vocab, task.seq_len, cfg.seed, "cpu")
    model.load_state_dict(ck.load_weights(res.run_dir, 20))
    train_loss, train_acc = _loss_acc(model, task.train_set())
    test_loss, test_acc = _loss_acc(model, task.eval_set(10**4, 0))
    assert last["eval/train_loss"] == pytest.approx(train_loss, abs=1e-4)
    assert last["eval/train_accuracy"] == pytest.approx(train_acc)
    assert last["eval/loss"] == pytest.approx(test_loss, abs=1e-4)
    assert last["eval/accuracy"] == pytest.approx(test_acc)
    assert last["eval/train_loss"] < last["eval/loss"]  # 20 full-batch steps fit the training pairs first
    assert rows[-1]["eval/train_loss"] < rows[0]["eval/train_loss"]


def test_split_and_metrics_survive_resume(tiny, tmp_path):
    straight = train(_cfg(tiny), run_dir=tmp_path / "straight").run_dir
    part = train(_cfg(tiny, **{"train.steps": 10}), run_dir=tmp_path / "part").run_dir
    train(_cfg(tiny, resume=str(part)))
    assert ck.read_metrics(straight) == ck.read_metrics(part)  # train-split metrics included
    saved = TrainConfig.from_dict(OmegaConf.to_container(OmegaConf.load(part / ".hydra" / "config.yaml")))
    a, b = make_task(saved.task), make_task(_cfg(tiny).task)
    assert torch.equal(a.split_pairs("train"), b.split_pairs("train"))
    assert torch.equal(a.split_pairs("test"), b.split_pairs("test"))


def test_tasks_without_a_finite_training_set_log_no_train_split_metrics(tiny, tmp_path):
    rows = ck.read_metrics(train(tiny(), run_dir=tmp_path / "run").run_dir)
    assert not any("eval/train_loss" in r for r in rows)
