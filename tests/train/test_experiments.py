"""Every experiment composes, validates and lowers its training loss in a handful of steps; each
task has a default experiment with a stop target; the canon experiments hold their papers' settings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from toylens._paths import config_dir
from toylens.data import TASKS, make_task
from toylens.model.build import build_model
from toylens.runs import checkpoint as ck
from toylens.runs.config import TrainConfig, register_configs, validate
from toylens.train.loop import train

register_configs()
EXPERIMENTS = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))


def _compose(*overrides: str) -> TrainConfig:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="train", overrides=list(overrides)))


def _masked_loss(model, batch) -> float:
    with torch.no_grad():
        logits = model(batch.tokens)
    return F.cross_entropy(logits[batch.loss_mask], batch.targets[batch.loss_mask]).item()


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_lowers_the_loss_in_a_few_steps(experiment, tmp_path):
    """A handful of the experiment's own steps (warmup shortened) lower the loss on a fixed batch: the
    training split for full-batch tasks (their held-out loss first rises while they memorise), else
    the held-out set. Both are evaluated without noise, before training and after."""
    steps = 12
    cfg = _compose(f"experiment={experiment}", f"train.steps={steps}", f"train.eval_every={steps}",
                   "train.eval_size=256", f"train.checkpoint_every={steps}", "optim.warmup_steps=2",
                   "train.progress=false", "logger=none", "device=cpu")
    validate(cfg)
    task = make_task(cfg.task)
    batch = task.train_set() or task.eval_set(256, cfg.train.eval_seed)
    before = _masked_loss(build_model(cfg.model, task.d_vocab, task.seq_len, cfg.seed, "cpu"), batch)
    res = train(cfg, run_dir=tmp_path / "run")
    last = [r for r in ck.read_metrics(res.run_dir) if "eval/loss" in r][-1]
    after = last["eval/train_loss" if task.train_set() is not None else "eval/loss"]
    assert last["step"] == steps and after < before - 1e-3, (before, after)


def test_every_task_has_a_default_experiment_that_stops_when_solved():
    for name in sorted(set(TASKS) - {"sequences"}):  # sequences trains on the user's own file: no default data
        assert name in EXPERIMENTS, f"configs/experiment/{name}.yaml is missing"
        cfg = _compose(f"experiment={name}")
        assert cfg.task.name == name and cfg.name == name
        t = cfg.train
        assert (t.stop_at_accuracy or 0) >= 0.99 or t.stop_at_eval_loss is not None
        assert cfg.threads == 0  # auto: 1 on a busy machine, one per core when idle (README)
        if name != "prev_token":  # order matters in every other task: it needs positions
            assert cfg.model.positional_embedding_type in ("standard", "rotary"), name


def test_grokking_nanda_is_the_paper_verbatim():
    cfg = _compose("experiment=grokking_nanda")
    m, o, t, task = cfg.model, cfg.optim, cfg.train, cfg.task
    assert (task.name, task.p, task.frac_train, task.full_batch) == ("modular_add", 113, 0.3, True)
    assert (m.n_layers, m.d_model, m.n_heads, m.d_head, m.d_mlp) == (1, 128, 4, 32, 512)
    assert (m.act_fn, m.normalization_type, m.attn_only) == ("relu", None, False)
    assert (o.lr, o.weight_decay, list(o.betas), o.warmup_steps, o.grad_clip) == (1e-3, 1.0, [0.9, 0.98], 10, None)
    assert o.schedule == "constant" and not o.decay_matrices_only  # AdamW(model.parameters(), wd=1.0)
    assert t.checkpoint_every < t.steps and t.keep_last * t.checkpoint_every >= t.steps


def test_grokking_is_the_same_model_and_split_with_faster_settings():
    fast, paper = _compose("experiment=grokking"), _compose("experiment=grokking_nanda")
    assert fast.model == paper.model and fast.task == paper.task
    assert fast.optim.lr > paper.optim.lr and fast.optim.weight_decay >= paper.optim.weight_decay
    assert fast.train.steps // fast.train.checkpoint_every >= 20  # dense enough for over=checkpoints


def test_induction_heads_is_attention_only_on_random_offsets_with_dense_checkpoints():
    cfg = _compose("experiment=induction_heads")
    m, task, t = cfg.model, cfg.task, cfg.train
    assert m.attn_only and m.n_layers == 2 and m.n_heads >= 2 and m.positional_embedding_type == "standard"
    assert task.name == "induction" and task.layout == "random" and task.pad > 0
    assert t.steps // t.checkpoint_every >= 20 and t.keep_last * t.checkpoint_every >= t.steps
