"""The analyze config (``configs/analyze.yaml``'s schema) and its validation.

``validate`` checks what types cannot, raising ``ConfigError`` with one line naming the field and the fix.
"""


from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from omegaconf import MISSING

from toylens.analyze.learning_coefficient import INSTALL_HINT, LLCConfig
from toylens.analyze.pretrained import AnalyzeModelConfig, PretrainedError, check_model_config, register_model_configs

# The sections, in page order, and what each needs: the one list in toylens/report/registry.py ("circuits" folds the
# model itself when "fold" is not asked for). analyses=[...] also takes the user's own (module:func, file.py:func,
# or a toylens.analyses plugin).
from toylens.report.registry import ANALYSES, resolve_all, resolve_dynamics
from toylens.runs.config import ConfigError
from toylens.runs.run import ANALYSIS_SEED, FOLD_TOL

__all__ = ["ANALYSES", "AnalyzeConfig", "validate"]
ABLATION_MODES = ("mean", "zero", "resample")


@dataclass
class BatchConfig:
    size: int = 2000  # rows of the run's task
    seed: int = ANALYSIS_SEED


@dataclass
class AblationConfig:
    modes: list[str] = field(default_factory=lambda: ["mean"])  # any of mean, zero, resample
    per_head: bool = True  # also ablate each head alone when a layer has several
    chunk_rows: int = 100  # rows per forward pass (speed and memory only)
    top_k: int = 30  # bars in the ranked chart (the table always lists every hook)


@dataclass
class PairsConfig:  # clean/corrupted pairs for patching and tracing
    n: int = 32  # pairs drawn from the run's task corrupt() when no prompts are given
    seed: int = ANALYSIS_SEED + 2
    clean: list[str] = field(default_factory=list)  # or prompt strings (equal token lengths), with
    corrupted: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)  # the clean prompts' answers
    wrong_answers: list[str] = field(default_factory=list)  # the corrupted prompts' answers


@dataclass
class PatchingConfig:
    kinds: list[str] = field(default_factory=lambda: ["block_every", "attn_head_all_pos_every", "z_by_pos"])
    metric: str = "logit_diff"  # logit_diff | loss | accuracy
    attribution: bool = True  # also attribution patching, with its correlation to the exact sweeps


@dataclass
class TracingConfig:
    prompts: int = 8  # the first pairs' clean prompts
    noise: list[int] = field(default_factory=list)  # positions to noise; empty: every position before the answer
    kinds: list[str] = field(default_factory=lambda: ["resid", "attn", "mlp"])
    n_samples: int = 5
    sigma: float | None = None  # null: 3 x the std of the embeddings
    window: int = 1
    metric: str = "prob"  # prob | logprob
    seed: int = 0


@dataclass
class TaskVectorsConfig:
    n: int = 256  # prompts per rule
    seed: int = ANALYSIS_SEED + 3


@dataclass
class DiscoveryConfig:  # circuit discovery on the pairs (toylens/analyze/discovery)
    method: str = "eap"  # exact | eap | eap_ig | acdc
    metric: str = "logit_diff"  # logit_diff | loss | accuracy | kl
    threshold: float | None = None  # acdc: its threshold (required); others: keep edges with |score| above it
    top_n: int | None = None  # keep the n best edges
    target: float = 0.9  # else: the fewest best edges recovering this share of the metric
    ig_steps: int = 5  # eap_ig: points on the path from the corrupted to the clean embeddings


@dataclass
class DynamicsConfig:  # over=checkpoints: toylens/analyze/dynamics.py
    analyses: list[str] = field(default_factory=lambda: ["attention", "circuits", "ablation"])  # +discovery, llc, yours
    steps: list[int] | None = None  # checkpoint steps to analyse; null: every saved one


@dataclass
class AnalyzeConfig:
    run: str | None = None  # the run directory toylens-train printed (required with model=run)
    step: int | None = None  # checkpoint step; null: the last
    task_source: str | None = None  # a .py file holding the run's own task class when its file is gone or changed
    data_path: str | None = None  # where the run's data file (task.path) is now, when it moved; its sha256 is checked
    model: AnalyzeModelConfig = field(default_factory=AnalyzeModelConfig)  # model=run | model=pretrained
    over: str | None = None  # checkpoints: also analyse every saved checkpoint against the step (dynamics)
    dynamics: DynamicsConfig = field(default_factory=DynamicsConfig)
    analyses: list[str] = field(default_factory=lambda: list(ANALYSES))
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    batch: BatchConfig = field(default_factory=BatchConfig)  # the evaluation batch every analysis uses
    # Ablation replaces activations by statistics of a separate batch (as seed 004 does).
    reference: BatchConfig = field(default_factory=lambda: BatchConfig(seed=ANALYSIS_SEED + 1))
    ablation: AblationConfig = field(default_factory=AblationConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    patching: PatchingConfig = field(default_factory=PatchingConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    task_vectors: TaskVectorsConfig = field(default_factory=TaskVectorsConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    llc: LLCConfig = field(default_factory=LLCConfig)  # dynamics.analyses=[llc]: the SGLD sampler's settings
    out: str | None = None  # model=pretrained: the report folder (with a run: <run>/report)
    chunk_size: int = 250  # rows per forward pass in every other analysis
    fold_tol: float = FOLD_TOL  # max |delta log-prob| allowed between folded and original model
    max_tokens: int = 50  # QK/OV token heatmaps show the first max_tokens tokens of the vocabulary
    progress: bool = True  # tqdm bars on stderr
    wandb: bool = True  # log to the run's wandb run when it was trained with logger=wandb
    strict: bool = False  # exit 1 (after writing the report) when any analysis failed; false: exit 0


def register_configs() -> None:
    """Register ``AnalyzeConfig`` with Hydra's ConfigStore as ``analyze_schema``."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="analyze_schema", node=AnalyzeConfig)
    register_model_configs()


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg: AnalyzeConfig) -> None:
    """Raise ConfigError (one line: field, problem, fix) for any value that cannot work."""
    _validate_discovery(cfg.discovery)
    try:
        check_model_config(cfg.model)
    except PretrainedError as e:
        raise ConfigError(str(e)) from None
    if cfg.model.source == "run":
        _need(isinstance(cfg.run, str) and cfg.run.strip() != "" and cfg.run != MISSING,
              "run is required: toylens-analyze run=<the run directory toylens-train printed>")
    resolve_all(list(cfg.analyses))  # built-ins, plugins, the user's references: ConfigError (one line) otherwise
    for key in ("batch", "reference"):
        size = getattr(cfg, key).size
        _need(size > 0, f"{key}.size={size} must be positive (rows of the task to analyse), e.g. {key}.size=2000")
    _need(cfg.over in (None, "checkpoints"), f"over={cfg.over!r}: use over=checkpoints (every saved checkpoint) or "
                                             f"leave it out (one checkpoint)")
    resolve_dynamics(list(cfg.dynamics.analyses))  # the built-in dynamics analyses or the user's (the eval loss always)
    if "llc" in cfg.dynamics.analyses:
        _validate_llc(cfg.llc)
    _need(cfg.step is None or cfg.step >= 0, f"step={cfg.step} must be a checkpoint step >= 0, or null for the last")
    _need(cfg.chunk_size > 0, f"chunk_size={cfg.chunk_size} must be positive, e.g. chunk_size=250")
    a = cfg.ablation
    _need(a.chunk_rows > 0, f"ablation.chunk_rows={a.chunk_rows} must be positive, e.g. ablation.chunk_rows=100")
    _need(a.top_k > 0, f"ablation.top_k={a.top_k} must be positive")
    bad = [m for m in a.modes if m not in ABLATION_MODES]
    _need(bool(a.modes) and not bad, f"ablation.modes={list(a.modes)}: choose one or more of "
                                     f"{', '.join(ABLATION_MODES)}, e.g. ablation.modes=[mean,zero]")
    p = cfg.pairs
    _need(p.n > 0, f"pairs.n={p.n} must be positive, e.g. pairs.n=32")
    _need(len(p.corrupted) == len(p.clean) and len(p.answers) == len(p.clean)
          and len(p.wrong_answers) in (0, len(p.clean)),
          f"pairs: {len(p.clean)} clean, {len(p.corrupted)} corrupted prompts, {len(p.answers)} answers and "
          f"{len(p.wrong_answers)} wrong_answers; give one of each per pair")
    _need(cfg.patching.metric in ("logit_diff", "loss", "accuracy"),
          f"patching.metric={cfg.patching.metric!r}: choose logit_diff, loss or accuracy")
    t = cfg.tracing
    _need(t.prompts > 0 and t.n_samples > 0 and t.window > 0,
          "tracing.prompts, tracing.n_samples and tracing.window must be positive")
    _need(t.metric in ("prob", "logprob"), f"tracing.metric={t.metric!r}: choose prob or logprob")
    _need(cfg.task_vectors.n > 0, f"task_vectors.n={cfg.task_vectors.n} must be positive")
    if cfg.model.source == "pretrained":
        _need(bool(cfg.out), "out is required with model=pretrained: the folder for the report, e.g. out=reports/gpt2")
        _need(bool(p.clean), "model=pretrained needs prompt pairs: pairs.clean=[...] pairs.corrupted=[...] "
                             "pairs.answers=[...] pairs.wrong_answers=[...]")
    _need(cfg.fold_tol > 0, f"fold_tol={cfg.fold_tol} must be positive, e.g. fold_tol=1e-4")
    _need(cfg.max_tokens > 0, f"max_tokens={cfg.max_tokens} must be positive, e.g. max_tokens=50")
    _need(cfg.device == "auto" or cfg.device.split(":")[0] in {"cpu", "cuda", "mps"},
          f"device={cfg.device!r} is unknown; choose auto, cpu, cuda, cuda:N or mps")


def config_dict(cfg: AnalyzeConfig) -> dict:
    return dataclasses.asdict(cfg)


def _validate_discovery(dc: DiscoveryConfig) -> None:
    methods, metrics = ("exact", "eap", "eap_ig", "acdc"), ("logit_diff", "loss", "accuracy", "kl")
    _need(dc.method in methods, f"discovery.method={dc.method!r} is unknown; choose one of {', '.join(methods)}")
    _need(dc.metric in metrics, f"discovery.metric={dc.metric!r} is unknown; choose one of {', '.join(metrics)}")
    _need(dc.method != "acdc" or dc.threshold is not None,
          "discovery.method=acdc needs discovery.threshold (e.g. discovery.threshold=0.01 with discovery.metric=kl)")
    _need(dc.threshold is None or dc.threshold > 0, f"discovery.threshold={dc.threshold} must be positive")
    _need(dc.top_n is None or dc.top_n >= 1, f"discovery.top_n={dc.top_n} must be at least 1")
    _need(0 < dc.target <= 1, f"discovery.target={dc.target} must lie in (0, 1], e.g. 0.9")
    _need(dc.ig_steps >= 1, f"discovery.ig_steps={dc.ig_steps} must be at least 1")


def _validate_llc(c: LLCConfig) -> None:
    """The ``llc.*`` keys, and devinterp being installed (before any checkpoint is loaded)."""
    _need(c.lr is None or c.lr > 0, f"llc.lr={c.lr} must be positive, or null to calibrate it (the default)")
    _need(c.n_beta > 0, f"llc.n_beta={c.n_beta} must be positive (default {LLCConfig.n_beta})")
    _need(c.localization >= 0, f"llc.localization={c.localization} must be >= 0 (default {LLCConfig.localization})")
    _need(c.num_chains >= 1, f"llc.num_chains={c.num_chains} must be at least 1 (default {LLCConfig.num_chains})")
    _need(c.num_draws is None or c.num_draws >= 8, f"llc.num_draws={c.num_draws} must be at least 8 (the "
                                                   f"chain-health check reads its quarters), or null (the default)")
    _need(c.batch_size >= 1, f"llc.batch_size={c.batch_size} must be at least 1")
    _need(c.n_rows >= c.batch_size, f"llc.n_rows={c.n_rows} must be at least llc.batch_size={c.batch_size}")
    draws = 64 if c.num_draws is None else c.num_draws  # null: at least 64
    _need(0 <= c.burnin < draws, f"llc.burnin={c.burnin} must lie in [0, llc.num_draws={draws})")
    try:
        import devinterp  # noqa: F401
    except ImportError:
        raise ConfigError(f"dynamics.analyses=[llc]: {INSTALL_HINT}") from None
