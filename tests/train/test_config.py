"""Config composition (every group, every experiment), typing at composition, and validation."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from toylens._paths import config_dir
from toylens.data import TASKS
from toylens.runs.config import ConfigError, TrainConfig, register_configs, validate

register_configs()
GROUPS = ["model", "task", "optim", "logger", "experiment", "debug"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def _compose(*overrides: str) -> TrainConfig:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        dcfg = compose(config_name="train", overrides=list(overrides))
    return OmegaConf.to_object(dcfg)


def test_every_group_has_options_and_every_task_has_a_config():
    for g in GROUPS:
        assert _options(g), f"configs/{g}/ is empty"
    assert set(_options("task")) == set(TASKS), "every registered task needs configs/task/<name>.yaml"


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_composes_and_validates(group, option, tmp_path):
    extra = []
    if option == "sequences":  # the user's own file is its one required setting
        (tmp_path / "s.txt").write_text("1 2 3 4\n4 3 2 1\n2 2 1 3\n3 1 4 2\n")
        extra = [f"task.path={tmp_path / 's.txt'}", "task.frac_train=0.5"]
    cfg = _compose(f"{group}={option}", *extra)
    assert isinstance(cfg, TrainConfig)
    validate(cfg)
    if group == "task":
        assert cfg.task.name == option and isinstance(cfg.task, TASKS[option].config_cls)
    if group == "experiment":
        assert cfg.name == option


def test_model_options_match_the_issue():
    seed = _compose("model=no_pos_2l").model
    assert (seed.n_layers, seed.d_model, seed.d_head, seed.n_heads, seed.d_mlp) == (2, 64, 64, 1, 256)
    assert (seed.act_fn, seed.normalization_type, seed.positional_embedding_type) == ("relu", "LN", "none")
    assert seed.d_vocab is None and seed.n_ctx is None  # taken from the task
    assert _compose("model=attn_only_1l").model.attn_only and _compose("model=attn_only_2l").model.n_layers == 2


def test_seed_004_exact_is_the_notebook_verbatim():
    cfg = _compose("experiment=seed_004_exact")
    o, t = cfg.optim, cfg.train
    assert (o.lr, list(o.betas), o.weight_decay, o.warmup_steps, o.grad_clip) == (1e-4, [0.9, 0.95], 0.1, 100, 1.0)
    assert o.schedule == "constant" and not o.decay_matrices_only
    assert (t.batch_size, t.steps) == (256, 4000)
    assert (cfg.task.d_vocab, cfg.task.seq_len) == (300, 50)


def test_user_keys_override():
    cfg = _compose("experiment=no_pos_prev_token", "model.d_model=128", "optim.lr=0.01", "train.steps=7",
                   "seed=3", "task.d_vocab=50")
    assert (cfg.model.d_model, cfg.optim.lr, cfg.train.steps, cfg.seed, cfg.task.d_vocab) == (128, 0.01, 7, 3, 50)


@pytest.mark.parametrize("override", ["model.d_modle=3", "train.stepz=1", "task.d_vocabb=3", "optim.lr=fast",
                                      "model.n_layers=two", "task=nonexistent", "logger=tensorboard"])
def test_typos_and_wrong_types_fail_at_composition(override):
    with pytest.raises(ConfigCompositionException):
        _compose(override)


def test_to_dict_from_dict_round_trip():
    cfg = _compose("experiment=no_pos_prev_token", "task=icl")
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again == cfg and type(again.task) is type(cfg.task)


# --- the invalid-config catalogue: each a one-line message naming the field ---------------------
CATALOGUE = [
    ({"model.d_model": 65, "model.n_heads": 2}, "model.d_model"),
    ({"model.n_ctx": 5}, "model.n_ctx"),
    ({"model.d_vocab": 10}, "model.d_vocab"),
    ({"optim.lr": 0.0}, "optim.lr"),
    ({"optim.lr": -1.0}, "optim.lr"),
    ({"train.batch_size": 0}, "train.batch_size"),
    ({"train.steps": -5}, "train.steps"),
    ({"train.eval_every": 0}, "train.eval_every"),
    ({"logger.name": "tensorboard"}, "logger"),
    ({"model.rotary_dim": 8}, "model.rotary_dim"),  # positional none combined with a rotary option
    ({"model.positional_embedding_type": "learned"}, "model.positional_embedding_type"),
    ({"model.act_fn": "swish"}, "model.act_fn"),
    ({"model.normalization_type": "BN"}, "model.normalization_type"),
    ({"optim.schedule": "step"}, "optim.schedule"),
    ({"optim.betas": [0.9]}, "optim.betas"),
    ({"optim.grad_clip": 0.0}, "optim.grad_clip"),
    ({"device": "tpu"}, "device"),
    ({"train.precision": "fp8"}, "train.precision"),
    ({"model.d_mlp": None}, "model.d_mlp"),
]


@pytest.mark.parametrize("overrides,field", CATALOGUE)
def test_invalid_config_catalogue(tiny, overrides, field):
    cfg = tiny(**overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(field), msg


def test_task_fields_are_validated(tiny):
    cfg = tiny()
    cfg.task.seq_len = 1
    with pytest.raises(ValueError, match="task.seq_len"):
        validate(cfg)
