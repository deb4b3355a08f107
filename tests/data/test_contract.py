"""The Task contract check (toylens.data.contract): every rule refused with its one line, every built-in passing it
through the one registry, and the two commands that run it (toylens-train before step 0, toylens-check-task)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch

from toylens.data import TASKS, Batch, Task, TaskConfig, task_class, task_config
from toylens.data.contract import TaskContractError, check_task
from toylens.data.registry import known_names, make_task


@dataclass
class GoodConfig(TaskConfig):
    name: str = "good"
    n: int = 5


class Good(Task):
    """Copy the previous token: a minimal task that keeps every rule."""

    name = "good"
    config_cls = GoodConfig

    @property
    def d_vocab(self):
        return 6

    @property
    def seq_len(self):
        return self.cfg.n

    @property
    def token_names(self):
        return [f"t{i}" for i in range(6)]

    def sample(self, batch_size, generator):
        tokens = torch.randint(0, 6, (batch_size, self.cfg.n), generator=generator, device=generator.device)
        targets = torch.roll(tokens, 1, dims=1)
        mask = torch.ones_like(tokens, dtype=torch.bool)
        mask[:, 0] = False
        return Batch(tokens, targets, mask)

    def corrupt(self, batch, generator):
        return Batch((batch.tokens + 1) % 6, (batch.targets + 1) % 6, batch.loss_mask)


def _variant(**methods):
    return type("Broken", (Good,), methods)(GoodConfig())


def _sample_with(change):
    def sample(self, batch_size, generator):
        return change(Good.sample(self, batch_size, generator))
    return sample


BROKEN = {
    "batch type": ("sample()", _variant(sample=lambda self, n, g: (torch.zeros(n, 5), None))),
    "shape": ("sample()", _variant(sample=_sample_with(lambda b: Batch(b.tokens[:, :4], b.targets[:, :4],
                                                                       b.loss_mask[:, :4])))),
    "dtype": ("sample()", _variant(sample=_sample_with(lambda b: Batch(b.tokens.int(), b.targets, b.loss_mask)))),
    "token range": ("sample()", _variant(sample=_sample_with(lambda b: Batch(b.tokens + 6, b.targets, b.loss_mask)))),
    "target range": ("sample()", _variant(sample=_sample_with(lambda b: Batch(b.tokens, b.targets - 7,
                                                                              b.loss_mask)))),
    "loss positions": ("sample()", _variant(sample=_sample_with(lambda b: Batch(b.tokens, b.targets,
                                                                                b.loss_mask & False)))),
    "seeded": ("sample()", _variant(sample=lambda self, n, g: Good.sample(
        self, n, torch.Generator().manual_seed(int(torch.randint(0, 10**9, (1,))))))),
    "corrupt": ("corrupt()", _variant(corrupt=lambda self, b, g: b)),
    "accuracy": ("accuracy()", _variant(accuracy=lambda self, logits, b: torch.tensor(3.0))),
    "properties": ("token_names", _variant(token_names=property(lambda self: ["a", "b"]))),
    "runs": ("sample()", _variant(sample=lambda self, n, g: 1 / 0)),
}


def test_a_good_task_passes_every_rule():
    passed = check_task(Good(GoodConfig()))
    assert {"properties", "shape", "dtype", "token range", "target range", "loss positions", "seeded", "corrupt",
            "accuracy"} <= set(passed)


@pytest.mark.parametrize("rule", sorted(BROKEN))
def test_each_broken_rule_is_one_line_naming_the_method_and_the_rule(rule):
    method, task = BROKEN[rule]
    with pytest.raises(TaskContractError) as e:
        check_task(task)
    msg = str(e.value)
    assert "\n" not in msg and f"rule: {rule})" in msg and method in msg and msg.startswith("task good:"), msg


def test_the_target_range_is_checked_only_where_the_loss_mask_is_set():
    def sample(self, n, g):
        b = Good.sample(self, n, g)
        targets = b.targets.clone()
        targets[:, 0] = -100  # ignored position: any value is allowed there
        return Batch(b.tokens, targets, b.loss_mask)

    assert "target range" in check_task(_variant(sample=sample))


def test_every_task_goes_through_the_one_registry_and_the_contract():
    assert set(TASKS) <= set(known_names())
    for name in known_names():
        cls = task_class(name)
        cfg = task_config(name)
        assert type(cfg) is cls.config_cls and cfg.name == name
        if name == "sequences":  # its file is a required setting: one line says so
            with pytest.raises(ValueError, match=r"task.path='\?\?\?' is required"):
                make_task(cfg)
            continue
        task = make_task(cfg)
        assert type(task) is cls
        assert "accuracy" in check_task(task), name


def test_the_python_api_takes_a_class_an_instance_a_config_and_a_file_reference(tmp_path):
    from toylens.runs.config import TrainConfig, validate

    path = tmp_path / "copy_task.py"
    path.write_text("import torch\nfrom toylens.data import Batch, Task, TaskConfig\n" + _GOOD_SOURCE)
    by_ref = TrainConfig(task=f"{path}:Good", device="cpu")
    validate(by_ref)
    assert by_ref.task.name == f"{path}:Good" and by_ref.task.n == 5
    from_class = TrainConfig(task=Good, device="cpu")
    assert from_class.task.name == f"{__name__}:Good" and type(from_class.task) is GoodConfig
    validate(from_class)
    from_instance = TrainConfig(task=Good(GoodConfig(n=7)), device="cpu")
    assert from_instance.task.n == 7 and task_class(from_instance.task.name) is Good
    from_config = TrainConfig(task=GoodConfig(n=3), device="cpu")
    assert from_config.task.n == 3 and task_class(from_config.task.name) is Good


_GOOD_SOURCE = '''
from dataclasses import dataclass

@dataclass
class GoodConfig(TaskConfig):
    name: str = "good"
    n: int = 5

class Good(Task):
    name = "good"
    config_cls = GoodConfig
    d_vocab = 6
    @property
    def seq_len(self):
        return self.cfg.n
    token_names = [f"t{i}" for i in range(6)]
    def sample(self, batch_size, generator):
        tokens = torch.randint(0, 6, (batch_size, self.cfg.n), generator=generator, device=generator.device)
        mask = torch.ones_like(tokens, dtype=torch.bool)
        mask[:, 0] = False
        return Batch(tokens, torch.roll(tokens, 1, dims=1), mask)
'''


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", HYDRA_FULL_ERROR="0")
    env.pop("WANDB_API_KEY", None)
    return env


def test_toylens_train_refuses_a_broken_task_before_writing_anything(tmp_path):
    src = textwrap.dedent("""
        import torch
        from toylens.data import Batch, Task, TaskConfig
    """) + _GOOD_SOURCE + textwrap.dedent("""
        class Wide(Good):
            def sample(self, batch_size, generator):
                b = super().sample(batch_size, generator)
                return Batch(b.tokens.int(), b.targets, b.loss_mask)
    """)
    (tmp_path / "tasks.py").write_text(src)
    p = subprocess.run([sys.executable, "-m", "toylens.train.cli", "task=tasks.py:Wide", "train.steps=2",
                        f"checkpoint_root={tmp_path / 'ck'}"], cwd=tmp_path, env=_env(), capture_output=True,
                       text=True, timeout=300)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "sample()" in lines[0] and "rule: dtype" in lines[0] and "torch.int32" in lines[0]
    assert not (tmp_path / "ck").exists()
    check = [sys.executable, "-m", "toylens.data.check_cli"]
    p = subprocess.run([*check, "tasks.py:Wide"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "rule: dtype" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = subprocess.run([*check, "tasks.py:Good", "n=4"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert "seq_len 4" in p.stdout and "PASS  seeded" in p.stdout and "corrupt() not offered" in p.stdout
    p = subprocess.run([*check, "tasks.py:Good", "nn=4"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "did you mean n?" in p.stderr


def test_a_users_task_may_not_take_a_built_in_name(tmp_path):
    from toylens.data import TaskRefError

    (tmp_path / "clash.py").write_text("import torch\nfrom toylens.data import Batch, Task, TaskConfig\n"
                                       + _GOOD_SOURCE.replace('name = "good"\n    config_cls', 'name = "copy"\n'
                                                              '    config_cls'))
    with pytest.raises(TaskRefError, match=r"a built-in task's name .*set name = \"my_copy\""):
        task_class(f"{tmp_path / 'clash.py'}:Good")
