"""One typed, validated training config.

The dataclasses below are registered with Hydra's ConfigStore, so a typo'd key or a value of the
wrong type fails at composition. ``validate`` checks what types cannot (d_model divisible by
n_heads, n_ctx long enough for the task, ...) and raises ``ConfigError`` with one line that names
the field and the fix. Nothing here has side effects: validation is a plain function called once
at the CLI edge, before anything is written.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, OmegaConf

from toylens.data import TASKS, TaskConfig, make_task


class ConfigError(ValueError):
    """A config value that cannot work; the message is one line naming the field and the fix."""


@dataclass
class ModelConfig:
    # HookedTransformerConfig's own names. d_vocab and n_ctx come from the task when left null.
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 1
    d_head: int = 64
    d_mlp: int | None = 256
    n_ctx: int | None = None
    d_vocab: int | None = None
    act_fn: str | None = "relu"
    normalization_type: str | None = "LN"
    positional_embedding_type: str = "standard"  # standard | rotary | none (toylens's own setting)
    attn_only: bool = False
    rotary_dim: int | None = None
    rotary_base: int = 10000
    use_attn_result: bool = False
    init_range: float | None = None  # None: TransformerLens's default 0.8 / sqrt(d_model)
    seed: int | None = None  # None: the run's top-level seed


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_matrices_only: bool = True  # decay only >=2-D weights (not biases or LayerNorm gains)
    warmup_steps: int = 100
    schedule: str = "constant"  # constant | cosine | linear (after warmup)
    min_lr_ratio: float = 0.0  # floor of cosine/linear decay, as a fraction of lr
    grad_clip: float | None = 1.0


@dataclass
class LoopConfig:
    batch_size: int = 256
    steps: int = 1000
    eval_every: int = 100
    eval_size: int = 2048
    eval_seed: int = 1234  # the held-out set is fixed per task, independent of the run's seed
    checkpoint_every: int = 500
    keep_last: int = 3  # checkpoints kept on disk (the final one is always kept)
    stop_at_eval_loss: float | None = None
    log_every: int = 10
    fast_forward: str = "auto"  # auto | on | off: fused training forward on the same parameters
    precision: str = "fp32"  # fp32 | bf16 (autocast; weights and optimizer stay fp32)
    compile: bool = False  # torch.compile: 35-46 s of compile time on CPU for <= 1.15x, so off by default
    progress: bool = True


@dataclass
class LoggerConfig:
    name: str = "none"  # none | wandb
    project: str = "toylens"
    entity: str | None = None
    mode: str = "online"  # online | offline | disabled; online falls back to offline without login/network
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    log_checkpoint: bool = True  # upload the final checkpoint as a wandb artifact


@dataclass
class TrainConfig:
    name: str = "default"  # experiment name: run directories go to <checkpoint_root>/<name>/<time>
    checkpoint_root: str = "checkpoints"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    resume: str | None = None  # a run directory to continue bit-for-bit
    model: ModelConfig = field(default_factory=ModelConfig)
    task: Any = MISSING  # one of the task config dataclasses (toylens.data)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Rebuild (and type-check) a config from ``to_dict`` output or a saved ``.hydra/config.yaml``."""
        d = dict(d)
        d.pop("hydra", None)
        task = d.get("task") or {}
        name = task.get("name")
        if name not in TASKS:
            raise ConfigError(f"task.name={name!r} is not a known task; choose one of {sorted(TASKS)}")
        schema = OmegaConf.structured(cls(task=TASKS[name].config_cls()))
        try:
            merged = OmegaConf.merge(schema, d)
        except Exception as e:  # omegaconf's errors are multi-line; keep the first line
            raise ConfigError(str(e).splitlines()[0]) from None
        return OmegaConf.to_object(merged)


def resolve_device(name: str) -> str:
    """``device=auto`` means CUDA when present, else CPU; asking for CUDA without it is a ConfigError."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available here; use device=cpu or device=auto")
    return name


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (called by the CLI before composition)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for name, task_cls in TASKS.items():
        cs.store(group="task", name=f"{name}_schema", node=task_cls.config_cls)


# --- validation --------------------------------------------------------------------------------
_ACT_FNS = {"relu", "gelu", "silu", "gelu_new", "gelu_fast", "solu_ln", "gelu_pytorch_tanh"}
_NORMS = {None, "LN", "LNPre", "RMS", "RMSPre"}
_POS = {"standard", "rotary", "none"}


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg: TrainConfig) -> None:
    """Raise ConfigError (one line: field, problem, fix) for any value that cannot work."""
    if not isinstance(cfg.task, TaskConfig) or cfg.task.name not in TASKS:
        name = getattr(cfg.task, "name", cfg.task)
        raise ConfigError(f"task={name!r} is not a known task; choose one of {sorted(TASKS)}")
    task = make_task(cfg.task)  # task configs validate their own fields (raising ValueError)
    m, o, t, lg = cfg.model, cfg.optim, cfg.train, cfg.logger
    for key in ("n_layers", "d_model", "n_heads", "d_head"):
        _need(getattr(m, key) > 0, f"model.{key}={getattr(m, key)} must be positive")
    _need(m.d_model % m.n_heads == 0,
          f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; "
          f"choose n_heads dividing {m.d_model}")
    _need(m.attn_only or (m.d_mlp is not None and m.d_mlp > 0),
          f"model.d_mlp={m.d_mlp} must be positive unless model.attn_only=true")
    _need(m.attn_only or m.act_fn in _ACT_FNS,
          f"model.act_fn={m.act_fn!r} is unknown; choose one of {sorted(_ACT_FNS)}")
    _need(m.normalization_type in _NORMS,
          f"model.normalization_type={m.normalization_type!r} is unknown; choose LN, LNPre, RMS, RMSPre or null")
    _need(m.positional_embedding_type in _POS,
          f"model.positional_embedding_type={m.positional_embedding_type!r} is unknown; "
          f"choose standard, rotary or none")
    if m.positional_embedding_type != "rotary":
        _need(m.rotary_dim is None,
              f"model.rotary_dim={m.rotary_dim} is only used with rotary embeddings; "
              f"set model.positional_embedding_type=rotary or model.rotary_dim=null")
    else:
        _need(m.rotary_dim is None or (0 < m.rotary_dim <= m.d_head and m.rotary_dim % 2 == 0),
              f"model.rotary_dim={m.rotary_dim} must be even and at most model.d_head={m.d_head}")
    if m.n_ctx is not None:
        _need(m.n_ctx >= task.seq_len,
              f"model.n_ctx={m.n_ctx} is shorter than task {task.name}'s sequence ({task.seq_len} tokens); "
              f"set model.n_ctx>={task.seq_len} or null")
    if m.d_vocab is not None:
        _need(m.d_vocab >= task.d_vocab,
              f"model.d_vocab={m.d_vocab} is smaller than task {task.name}'s vocabulary ({task.d_vocab}); "
              f"set model.d_vocab>={task.d_vocab} or null")
    _need(m.init_range is None or m.init_range > 0, f"model.init_range={m.init_range} must be positive or null")

    _need(o.name == "adamw", f"optim.name={o.name!r} is unknown; the only optimizer is adamw")
    _need(o.lr > 0, f"optim.lr={o.lr} must be positive")
    _need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
          f"optim.betas={list(o.betas)} must be two numbers in [0, 1)")
    _need(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    _need(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    _need(o.schedule in {"constant", "cosine", "linear"},
          f"optim.schedule={o.schedule!r} is unknown; choose constant, cosine or linear")
    _need(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    _need(o.grad_clip is None or o.grad_clip > 0, f"optim.grad_clip={o.grad_clip} must be positive or null")

    for key in ("batch_size", "steps", "eval_every", "eval_size", "checkpoint_every", "keep_last", "log_every"):
        _need(getattr(t, key) > 0, f"train.{key}={getattr(t, key)} must be positive")
    _need(t.stop_at_eval_loss is None or t.stop_at_eval_loss > 0,
          f"train.stop_at_eval_loss={t.stop_at_eval_loss} must be positive or null")
    _need(t.fast_forward in {"auto", "on", "off"}, f"train.fast_forward={t.fast_forward!r}: choose auto, on or off")
    _need(t.precision in {"fp32", "bf16"}, f"train.precision={t.precision!r}: choose fp32 or bf16")

    _need(lg.name in {"none", "wandb"}, f"logger={lg.name!r} is unknown; choose logger=none or logger=wandb")
    _need(lg.mode in {"online", "offline", "disabled"},
          f"logger.mode={lg.mode!r} is unknown; choose online, offline or disabled")
    _need(cfg.device == "auto" or cfg.device.split(":")[0] in {"cpu", "cuda", "mps"},
          f"device={cfg.device!r} is unknown; choose auto, cpu, cuda, cuda:N or mps")
