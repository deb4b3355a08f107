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
            with pytest.raises(ValueError, match=r"task.path=\?\?\?: no file given; add task.path="):
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
    # the rules checked before the broken one, as a passing check prints them, on stdout
    assert p.stdout.splitlines() == ["  PASS  properties", "  PASS  batch type", "  PASS  shape"], p.stdout
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


_MAJORITY_MODULE = textwrap.dedent('''
    from dataclasses import dataclass

    import torch

    from toylens.data import Batch, Task, TaskConfig


    @dataclass
    class MajorityConfig(TaskConfig):
        name: str = "majority"
        n_bits: int = 9


    class Majority(Task):
        config_cls = MajorityConfig
        d_vocab = 4
        token_names = ["0", "1", "BOS", "="]

        @property
        def seq_len(self):
            return self.cfg.n_bits + 2

        def sample(self, batch_size, generator):
            bits = torch.randint(0, 2, (batch_size, self.cfg.n_bits), generator=generator, device=generator.device)
            ends = torch.full((batch_size, 1), 3, device=generator.device)
            tokens = torch.cat([ends - 1, bits, ends], 1)
            mask = torch.zeros_like(tokens, dtype=torch.bool)
            mask[:, -1] = True
            return Batch(tokens, (2 * bits.sum(1, keepdim=True) > self.cfg.n_bits).long().expand_as(tokens), mask)


    class MajorityLoud(Majority):  # shares MajorityConfig without declaring it: Majority owns that config
        pass
''')


def test_a_config_instance_selects_the_class_of_its_type_not_a_task_of_its_name(tmp_path, monkeypatch):
    """TrainConfig(task=MajorityConfig(n_bits=5)): the Task whose config_cls is the instance's type, recorded by its
    canonical reference; a plugin installed under the config's default name ("majority") is not used."""
    from toylens.runs.config import TrainConfig

    mod = f"majority_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{mod}.py").write_text(_MAJORITY_MODULE)
    site = tmp_path / "site"  # an installed plugin "majority": another class, another config
    (site / "other_majority").mkdir(parents=True)
    other = _MAJORITY_MODULE.replace("n_bits: int = 9", "n_bits: int = 3")
    (site / "other_majority" / "__init__.py").write_text(other)
    (site / "other_majority-0.1.dist-info").mkdir()
    (site / "other_majority-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: other-majority\n"
                                                                    "Version: 0.1\n")
    (site / "other_majority-0.1.dist-info" / "entry_points.txt").write_text("[toylens.tasks]\n"
                                                                            "majority = other_majority:Majority\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    user = importlib.import_module(mod)
    try:
        assert "majority" in known_names()  # the plugin is installed: the old lookup by name took it
        cfg = TrainConfig(task=user.MajorityConfig(n_bits=5), device="cpu")
        assert cfg.task.name == f"{mod}:Majority" and cfg.task.n_bits == 5
        task = make_task(cfg.task)
        assert type(task) is user.Majority and task.seq_len == 7
        assert repr(task) == f"Majority(n_bits=5) from {mod}:Majority"
        assert task_class(cfg.task.name) is user.Majority  # the recorded reference selects it again
    finally:
        sys.modules.pop(mod, None)
        sys.modules.pop("other_majority", None)


def test_a_config_instance_without_a_loaded_class_is_found_in_its_module_or_named(tmp_path):
    from toylens.data import TaskRefError
    from toylens.refs import load_file

    path = tmp_path / "maj.py"
    path.write_text(_MAJORITY_MODULE)
    config_cls = load_file(path, "MajorityConfig", key="task", ref="maj.py:MajorityConfig")[0]
    cfg = task_config(config_cls(n_bits=3))  # no plugin here: the old lookup said "task=majority is not a task"
    assert cfg.name == f"{path}:Majority" and type(make_task(cfg)).__name__ == "Majority"

    @dataclass
    class LonelyConfig(TaskConfig):
        name: str = "lonely"

    with pytest.raises(TaskRefError, match=r"^task=LonelyConfig\(\.\.\.\): no Task subclass with config_cls = "
                                           r"LonelyConfig .*pass the Task class itself"):
        task_config(LonelyConfig())


def test_a_misspelt_class_says_did_you_mean_and_lists_the_tasks_first(tmp_path):
    from toylens.data import TaskRefError

    (tmp_path / "majority.py").write_text(_MAJORITY_MODULE)
    with pytest.raises(TaskRefError) as e:
        task_class(f"{tmp_path / 'majority.py'}:Majorty")
    msg = str(e.value)
    assert "has no 'Majorty'; did you mean Majority?" in msg
    assert msg.split("it defines ")[1].startswith("Majority, MajorityLoud, Batch"), msg


def test_a_wrongly_typed_setting_of_a_users_task_names_the_type_and_an_example(tmp_path):
    from toylens.runs.config import ConfigError, TrainConfig

    (tmp_path / "majority.py").write_text(_MAJORITY_MODULE)
    ref = f"{tmp_path / 'majority.py'}:Majority"
    with pytest.raises(ConfigError) as e:
        TrainConfig(task={"name": ref, "n_bits": "abc"})
    assert str(e.value) == "task.n_bits='abc': expected an int (e.g. task.n_bits=9)"


def test_built_in_tasks_print_their_settings(capsys):
    task = make_task(TASKS["prev_token"].config_cls(d_vocab=20, seq_len=12))
    shown = repr(task)
    assert shown.startswith(f"{type(task).__name__}(") and "d_vocab=20" in shown and " from " not in shown


def test_check_task_help_is_plain_text(monkeypatch, capsys):
    from toylens.data import check_cli

    monkeypatch.setattr(sys, "argv", ["toylens-check-task", "--help"])
    check_cli.main()
    out = capsys.readouterr().out
    assert out.startswith("toylens-check-task <task>") and "``" not in out and "usage:" in out
