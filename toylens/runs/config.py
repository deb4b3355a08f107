"""One typed, validated training config.

The dataclasses below are registered with Hydra's ConfigStore, so a typo'd key or a value of the
wrong type fails at composition. ``validate`` checks what types cannot (d_model divisible by
n_heads, n_ctx long enough for the task, ...) and raises ``ConfigError`` with one line that names
the field and the fix. Nothing here has side effects: validation is a plain function called once
at the CLI edge, before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, OmegaConf

from toylens.data import TASKS, TaskConfig, TaskRefError, make_task, task_class, task_config


class ConfigError(ValueError):
    """A config value that cannot work; the message is one line naming the field and the fix."""


@dataclass
class ModelConfig:
    # HookedTransformerConfig's own names. d_vocab and n_ctx come from the task when left null.
    n_layers: int = 2  # transformer blocks
    d_model: int = 64  # residual stream width
    n_heads: int = 1  # attention heads per layer
    d_head: int = 64  # width of each head
    d_mlp: int | None = 256  # MLP hidden width (ignored when attn_only)
    n_ctx: int | None = None  # context length; null: the task's sequence length
    d_vocab: int | None = None  # vocabulary size; null: the task's
    act_fn: str | None = "relu"  # relu | gelu | silu | gelu_new | ...
    normalization_type: str | None = "LN"  # LN | LNPre | RMS | RMSPre | null
    positional_embedding_type: str = "standard"  # standard | rotary | none (toylens's own setting)
    attn_only: bool = False  # no MLPs
    rotary_dim: int | None = None  # rotary only: dimensions rotated per head; null: d_head
    rotary_base: int = 10000  # rotary only: the frequency base
    use_attn_result: bool = False  # compute per-head hook_result (slower; analyses turn it on as needed)
    init_range: float | None = None  # None: TransformerLens's default 0.8 / sqrt(d_model)
    seed: int | None = None  # None: the run's top-level seed


@dataclass
class OptimConfig:
    name: str = "adamw"  # the only optimizer
    lr: float = 1e-3  # peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # decoupled weight decay
    decay_matrices_only: bool = True  # decay only >=2-D weights (not biases or LayerNorm gains)
    warmup_steps: int = 100  # linear warmup from 0
    schedule: str = "constant"  # constant | cosine | linear (after warmup)
    min_lr_ratio: float = 0.0  # floor of cosine/linear decay, as a fraction of lr
    grad_clip: float | None = 1.0  # max gradient norm; null: no clipping
    schedule_steps: int | None = None  # length of the lr schedule; null: train.steps (a resume keeps the run's)


@dataclass
class LoopConfig:
    batch_size: int = 256  # sequences per step
    steps: int = 1000  # optimisation steps
    eval_every: int = 100  # steps between held-out evaluations
    eval_size: int = 2048  # held-out sequences
    eval_seed: int = 1234  # the held-out set is fixed per task, independent of the run's seed
    checkpoint_every: int = 500  # steps between checkpoints (the last step is always saved)
    keep_last: int = 3  # checkpoints kept on disk (the final one is always kept)
    stop_at_eval_loss: float | None = None  # stop once eval/loss is below this
    stop_at_accuracy: float | None = None  # stop once eval/accuracy reaches this (e.g. 0.999)
    log_every: int = 10  # steps between metrics.jsonl rows
    fast_forward: str = "auto"  # auto | on | off: fused training forward on the same parameters
    precision: str = "fp32"  # fp32 | bf16 (autocast; weights and optimizer stay fp32) | auto (bf16 where fast)
    compile: bool = False  # torch.compile: 35-46 s of compile time on CPU for <= 1.15x, so off by default
    progress: bool = True  # tqdm bar on stderr


@dataclass
class LoggerConfig:
    name: str = "none"  # none | wandb
    project: str = "toylens"  # wandb project
    entity: str | None = None  # wandb entity; null: your default
    mode: str = "online"  # online | offline | disabled; online falls back to offline without login/network
    group: str | None = None  # wandb group (sweeps set it)
    tags: list[str] = field(default_factory=list)  # wandb tags
    log_checkpoint: bool = True  # upload the final checkpoint as a wandb artifact


@dataclass
class TrainConfig:
    name: str = "default"  # experiment name: run directories go to <checkpoint_root>/<name>/<time>
    checkpoint_root: str = "checkpoints"  # where run directories go (relative to the working directory)
    seed: int = 0  # model init and training data
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: int | None = 0  # torch intra-op threads; 0: auto (1 on a busy machine, else one per core); null: torch's
    resume: str | None = None  # a run directory to continue bit-for-bit
    task_source: str | None = None  # resume=: a .py file holding the run's own task class when its file is gone
    data_path: str | None = None  # resume=: where the run's data file (task.path) is now, when it moved
    model: ModelConfig = field(default_factory=ModelConfig)
    task: Any = MISSING  # one of the task config dataclasses (toylens.data)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def __post_init__(self) -> None:
        # The Python API accepts what the CLI accepts: task="induction" or task="parity.py:Parity" means that task's
        # default config, found through the one registry (toylens.data.registry); also a Task subclass or its
        # config, and the composed Hydra node of a user's task (a mapping with its name).
        if not (isinstance(self.task, str) and self.task == MISSING):
            try:
                self.task = task_config(self.task)
            except TaskRefError as e:
                raise ConfigError(str(e)) from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Rebuild (and type-check) a config from ``to_dict`` output or a saved ``.hydra/config.yaml``."""
        d = dict(d)
        d.pop("hydra", None)
        task = d.get("task") or {}
        name = task.get("name")
        try:
            task_cls = task_class(name, key="task.name")
        except TaskRefError as e:
            raise ConfigError(str(e)) from None
        schema = OmegaConf.structured(cls(task=task_cls.config_cls(name=name)))
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
    if name.startswith("cuda:") and int(name.split(":")[1] or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device={name} but this machine has {torch.cuda.device_count()} CUDA device(s); "
                          f"use device=cuda or device=auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device=mps but MPS (Apple GPU) is not available here; use device=cpu or device=auto")
    return name


def read_saved_config(path) -> dict:
    """A run's saved ``.hydra/config.yaml`` as a plain dict, WITHOUT resolving interpolations.

    toylens saves configs resolved, so a ``${...}`` in one was put there by hand: it is kept as the
    literal text (escaped for OmegaConf), never resolved from the environment. Raises ``ValueError``
    (one line) for a file that is not a YAML mapping.
    """
    import yaml

    try:
        raw = yaml.safe_load(open(path, encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"not valid YAML ({' '.join(str(e).split())[:160]})") from None
    if not isinstance(raw, dict):
        raise ValueError("not a config mapping")

    def literal(v):
        if isinstance(v, str):  # OmegaConf reads n backslashes + "${" as n // 2 of them + an escaped "${"
            return re.sub(r"(\\*)\$\{", lambda m: "\\" * (2 * len(m.group(1)) + 1) + "${", v)
        if isinstance(v, dict):
            return {k: literal(x) for k, x in v.items()}
        if isinstance(v, list):
            return [literal(x) for x in v]
        return v

    return literal(raw)


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (called by the CLI before composition)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for name, task_cls in TASKS.items():
        cs.store(group="task", name=f"{name}_schema", node=task_cls.config_cls)


def register_task_option(value: str) -> None:
    """Make ``task=<value>`` a Hydra option when ``value`` is a plugin or a reference (``module:Class``,
    ``path/file.py:Class``): its config dataclass's defaults become the ``task.*`` keys. The node is a plain mapping
    (the types are checked when the config is built, by the registry), so it pickles to any launcher's workers
    without the user's class. Raises ConfigError (one line) when ``value`` selects no task."""
    from hydra.core.config_store import ConfigStore

    try:
        cfg = task_config(value)
    except TaskRefError as e:
        raise ConfigError(str(e)) from None
    group, _, name = f"task/{value}".rpartition("/")  # path/to/file.py:Class: Hydra looks in task/path/to
    node = OmegaConf.to_container(OmegaConf.structured(cfg))
    ConfigStore.instance().store(group=group, name=name, node=node, package="task")


# --- validation --------------------------------------------------------------------------------
_ACT_FNS = {"relu", "gelu", "silu", "gelu_new", "gelu_fast", "solu_ln", "gelu_pytorch_tanh"}
_NORMS = {None, "LN", "LNPre", "RMS", "RMSPre"}
_POS = {"standard", "rotary", "none"}


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg: TrainConfig) -> None:
    """Raise ConfigError (one line: field, problem, fix) for any value that cannot work."""
    if not isinstance(cfg.task, TaskConfig):
        raise ConfigError(f"task={cfg.task!r} is not a task config; choose a task (task=<name> or module:Class)")
    try:
        task = make_task(cfg.task)  # task configs validate their own fields (raising ValueError)
    except (ValueError, TypeError) as e:
        msg = " ".join(str(e).split())
        raise ConfigError(msg if msg.startswith("task") else f"task ({cfg.task.name}): {msg}") from None
    check_task_contract(task, cfg.device)
    _need(cfg.data_path is None or bool(cfg.resume),
          f"data_path={cfg.data_path} only points a resumed run at its moved data file; for a new run set "
          f"task.path={cfg.data_path} instead")
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
    _need(m.rotary_base > 0, f"model.rotary_base={m.rotary_base} must be positive (10000 is the usual choice)")
    _need(m.positional_embedding_type in _POS,
          f"model.positional_embedding_type={m.positional_embedding_type!r} is unknown; "
          f"choose standard, rotary or none")
    if m.positional_embedding_type != "rotary":
        _need(m.rotary_dim is None,
              f"model.rotary_dim={m.rotary_dim} is only used with rotary embeddings; "
              f"set model.positional_embedding_type=rotary or model.rotary_dim=null")
        _need(m.rotary_base == 10000,
              f"model.rotary_base={m.rotary_base} is only used with rotary embeddings; "
              f"set model.positional_embedding_type=rotary or drop model.rotary_base")
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
    _need(m.init_range is None or 0 < m.init_range < math.inf,
          f"model.init_range={m.init_range} must be positive and finite or null")

    _need(o.name == "adamw", f"optim.name={o.name!r} is unknown; the only optimizer is adamw")
    _need(0 < o.lr < math.inf, f"optim.lr={o.lr} must be a positive finite number (e.g. 1e-3)")
    _need(0 < o.eps < math.inf, f"optim.eps={o.eps} must be a positive finite number (e.g. 1e-8)")
    _need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
          f"optim.betas={list(o.betas)} must be two numbers in [0, 1)")
    _need(0 <= o.weight_decay < math.inf, f"optim.weight_decay={o.weight_decay} must be >= 0 and finite")
    _need(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    _need(o.schedule in {"constant", "cosine", "linear"},
          f"optim.schedule={o.schedule!r} is unknown; choose constant, cosine or linear")
    _need(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    _need(o.grad_clip is None or 0 < o.grad_clip < math.inf,
          f"optim.grad_clip={o.grad_clip} must be positive and finite, or null")
    _need(o.schedule_steps is None or o.schedule_steps > 0,
          f"optim.schedule_steps={o.schedule_steps} must be positive or null (null: train.steps)")

    for key in ("batch_size", "steps", "eval_every", "eval_size", "checkpoint_every", "keep_last", "log_every"):
        _need(getattr(t, key) > 0, f"train.{key}={getattr(t, key)} must be positive")
    _need(t.stop_at_eval_loss is None or 0 < t.stop_at_eval_loss < math.inf,
          f"train.stop_at_eval_loss={t.stop_at_eval_loss} must be positive and finite, or null")
    _need(t.stop_at_accuracy is None or 0 < t.stop_at_accuracy <= 1,
          f"train.stop_at_accuracy={t.stop_at_accuracy} must be in (0, 1] or null")
    _need(cfg.threads is None or cfg.threads >= 0,
          f"threads={cfg.threads} must be positive, 0 (auto) or null (torch's default)")
    _need(t.fast_forward in {"auto", "on", "off"}, f"train.fast_forward={t.fast_forward!r}: choose auto, on or off")
    _need(t.precision in {"fp32", "bf16", "auto"}, f"train.precision={t.precision!r}: choose fp32, bf16 or auto")

    _need(lg.name in {"none", "wandb"}, f"logger={lg.name!r} is unknown; choose logger=none or logger=wandb")
    _need(lg.mode in {"online", "offline", "disabled"},
          f"logger.mode={lg.mode!r} is unknown; choose online, offline or disabled")
    _need(cfg.device == "auto" or cfg.device.split(":")[0] in {"cpu", "cuda", "mps"},
          f"device={cfg.device!r} is unknown; choose auto, cpu, cuda, cuda:N or mps")
    check_memory(cfg, task.d_vocab, task.seq_len)


def check_task_contract(task, device: str = "cpu") -> None:
    """The Task contract on samples of ``task`` (toylens.data.contract), before step 0: ConfigError (one line
    naming the method and the rule) when it is broken. Sampled on the CPU: it checks the task, not the device."""
    from toylens.data.contract import TaskContractError, check_task

    try:
        check_task(task)
    except TaskContractError as e:
        raise ConfigError(str(e)) from None


# --- memory: estimated before anything is allocated ---------------------------------------------
_GiB = 2**30


def _available_bytes(device: str) -> int | None:
    """Free memory where the model will live: the GPU's when CUDA is asked for, else the host's."""
    if device.startswith("cuda") or device == "auto":
        import torch

        if torch.cuda.is_available():
            idx = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
            return torch.cuda.mem_get_info(idx)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None


def memory_estimate(cfg: TrainConfig, d_vocab: int, seq_len: int) -> dict[str, int]:
    """Bytes needed, by what drives them: the model (weights, gradients, two AdamW moments), one
    training step's activations (``train.batch_size``) and the held-out set (``train.eval_size``).
    Rough (within ~2x) but computed from the config alone, so absurd sizes fail before allocating."""
    m, t = cfg.model, cfg.train
    V, S, d, L, H, dh = m.d_vocab or d_vocab, m.n_ctx or seq_len, m.d_model, m.n_layers, m.n_heads, m.d_head
    mlp = 0 if m.attn_only else (m.d_mlp or 0)
    params = 2 * V * d + S * d + L * (4 * d * H * dh + 2 * d * mlp + 4 * d)
    per_token = L * (12 * d + 4 * H * dh + 3 * H * S + 3 * mlp) + 4 * V  # floats kept for the backward pass
    seq = seq_len
    return {
        "model": 4 * 4 * params,
        "train.batch_size": 4 * t.batch_size * seq * per_token + 17 * t.batch_size * seq,
        "train.eval_size": 17 * t.eval_size * seq + 4 * min(t.eval_size, 512) * seq * per_token // 3,
    }


def check_memory(cfg: TrainConfig, d_vocab: int, seq_len: int) -> None:
    est = memory_estimate(cfg, d_vocab, seq_len)
    avail = _available_bytes(cfg.device)
    total = sum(est.values())
    if avail is None or total <= avail:
        return
    worst = "model" if est["model"] > avail else max(est, key=est.get)
    m, t = cfg.model, cfg.train
    what = {"model": (f"model.d_model={m.d_model}, model.d_mlp={m.d_mlp}, model.n_layers={m.n_layers}",
                      "the model (weights, gradients, AdamW state)", "a smaller model"),
            "train.batch_size": (f"train.batch_size={t.batch_size} (with model.d_model={m.d_model})",
                                 "one training step's activations", "a smaller train.batch_size or model"),
            "train.eval_size": (f"train.eval_size={t.eval_size}", "the held-out set", "a smaller train.eval_size")}
    fields, noun, fix = what[worst]
    raise ConfigError(f"{fields}: {noun} would need ~{est[worst] / _GiB:.3g} GiB but {avail / _GiB:.3g} GiB "
                      f"of memory is available; choose {fix}")


def resolve_precision(precision: str, device: str) -> str:
    """``auto``: bf16 where the hardware computes it natively (a CUDA GPU with bf16, or a CPU whose oneDNN
    has bf16 kernels: AVX512-BF16/AMX), else fp32. Emulated bf16 on a CPU without them is many times slower."""
    if precision != "auto":
        return precision
    import torch

    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device == "cpu":
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    return "fp32"


def resolve_threads(threads: int | None) -> int | None:
    """``0`` (auto): one torch thread when other work keeps the cores busy (1-minute load average at least
    half the cores: threads that wait for each other then cost more than they give), else one per core.
    Measured on this 2-core machine, experiment=no_pos_prev_token: idle, 2 threads 22.5 s against 34.1 s with
    1; shared (load ~12), 1 thread 72-86 s against 221 s with 2. ``None``: torch's default."""
    if threads != 0:
        return threads
    import os

    cores = os.cpu_count() or 1
    busy = os.getloadavg()[0] >= cores / 2 if hasattr(os, "getloadavg") else False
    return 1 if busy else cores
