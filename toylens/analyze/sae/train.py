"""Train a sparse autoencoder on one hook of a toylens model with SAELens (the engine: its
``LanguageModelSAETrainingRunner`` with our model and the task's own sequences as the dataset).
Training curves are read from SAELens's own training forward pass (``TrainStepOutput``) as it runs."""

from __future__ import annotations

import contextlib
import math
import signal
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class SAESettings:
    """What ``toylens-sae`` trains; every field is a ``key=value`` on its command line."""

    d_sae: int = 512  # number of latents (dictionary size)
    l1: float = 0.7  # L1 sparsity coefficient (SAELens standard SAE, on normalized activations)
    steps: int = 1500  # SAE optimizer steps
    batch_tokens: int = 2048  # activations per SAE step
    lr: float = 2e-3  # Adam learning rate
    seed: int = 0  # seeds the SAE's initialisation and the task sequences
    log_every: int = 25  # steps between recorded training-curve points
    dead_window: int = 200  # a latent that has not fired for this many steps counts as dead

    def n_sequences(self, seq_len: int) -> int:
        """Task sequences in the dataset: enough for one pass, at most 16384 (then SAELens starts a new epoch)."""
        return max(64, min(16384, math.ceil(self.steps * self.batch_tokens / seq_len)))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Curves:
    """Training curves, one point every ``log_every`` steps: MSE per element and explained variance of the
    (SAELens-normalized) training batch, L0 (mean active latents per activation), dead latents."""

    step: list[int] = field(default_factory=list)
    mse: list[float] = field(default_factory=list)
    l0: list[float] = field(default_factory=list)
    dead: list[int] = field(default_factory=list)
    explained_variance: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def token_dataset(tokens: torch.Tensor):
    """A ``datasets.Dataset`` with one ``input_ids`` row per task sequence (what SAELens reads, pre-tokenized)."""
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": tokens.tolist()})


def runner_config(hook: str, d_in: int, context_size: int, s: SAESettings, out_dir: Path | None):
    """SAELens's ``LanguageModelSAERunnerConfig`` for a toy model on the CPU: no wandb, no hub, no checkpoints;
    the pre-tokenized task sequences are used as they are (no BOS, no separator, no concatenation)."""
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig, StandardTrainingSAEConfig

    sae_cfg = StandardTrainingSAEConfig(d_in=d_in, d_sae=s.d_sae, l1_coefficient=s.l1, device="cpu",
                                        apply_b_dec_to_input=False, normalize_activations="expected_average_only_in")
    return LanguageModelSAERunnerConfig(
        sae=sae_cfg, model_name="toylens", hook_name=hook, dataset_path="toylens-task", streaming=False,
        is_dataset_tokenized=True, context_size=context_size, prepend_bos=False, sequence_separator_token=None,
        disable_concat_sequences=True, training_tokens=s.steps * s.batch_tokens,
        train_batch_size_tokens=s.batch_tokens, store_batch_size_prompts=max(1, 4096 // context_size),
        # the mixing buffer (in tokens: n_batches_in_buffer * context_size) must hold two SAE batches
        n_batches_in_buffer=math.ceil(2 * s.batch_tokens / context_size), device="cpu", seed=s.seed, lr=s.lr,
        logger=LoggingConfig(log_to_wandb=False), checkpoint_path=None, n_checkpoints=0,
        output_path=None if out_dir is None else str(out_dir), verbose=False, n_eval_batches=1,
        dead_feature_window=s.dead_window, feature_sampling_window=max(s.dead_window, 1),
        n_batches_for_norm_estimate=20, model_kwargs={}, model_from_pretrained_kwargs={})


class _CurveRecorder:
    """Wraps the SAE's ``training_forward_pass`` (an instance attribute, as SAELens's own compile does) and
    records the curves from each step's output: the same quantities SAELens logs to wandb."""

    def __init__(self, sae, s: SAESettings):
        self.sae, self.s, self.curves = sae, s, Curves()
        self.inner = sae.training_forward_pass
        self.steps_since_fired = torch.zeros(s.d_sae, dtype=torch.long)
        self.n = 0

    @torch.no_grad()
    def _record(self, out) -> None:
        fired = out.feature_acts.bool().any(0).to_dense() if out.feature_acts.is_sparse else \
            (out.feature_acts > 0).any(0)
        self.steps_since_fired += 1
        self.steps_since_fired[fired.cpu()] = 0
        self.n += 1
        if self.n % self.s.log_every and self.n != self.s.steps:
            return
        x, y = out.sae_in.float(), out.sae_out.float()
        err = (y - x).pow(2).sum(-1)
        var = (x - x.mean(0)).pow(2).sum(-1)
        c = self.curves
        c.step.append(self.n)
        c.mse.append(float(err.mean() / x.shape[-1]))
        c.explained_variance.append(float(1 - err.mean() / var.mean()))
        c.l0.append(float((out.feature_acts > 0).float().sum(-1).mean()))
        c.dead.append(int((self.steps_since_fired > self.s.dead_window).sum()) if self.n > self.s.dead_window
                      else int((self.steps_since_fired >= self.n).sum()))
        c.loss.append(float(out.loss))

    def __call__(self, step_input):
        out = self.inner(step_input=step_input)
        self._record(out)
        return out


@contextlib.contextmanager
def _signals_restored():
    """SAELens installs its own SIGINT/SIGTERM handlers for the run; put ours back afterwards."""
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def train_sae(model, tokens: torch.Tensor, hook: str, s: SAESettings, out_dir: Path | None = None
              ) -> tuple[Any, Curves]:
    """Train a standard (ReLU + L1) SAE on ``hook`` of ``model`` over the task sequences ``tokens`` [n, pos]
    with SAELens; when ``out_dir`` is given, SAELens saves it there (``cfg.json``, ``sae_weights.safetensors``,
    ``sparsity.safetensors``, ``runner_cfg.json``). Returns (the trained ``TrainingSAE``, its ``Curves``)."""
    from sae_lens import LanguageModelSAETrainingRunner

    act = _hook_shape(model, hook, tokens[:1])
    cfg = runner_config(hook, act[-1], tokens.shape[1], s, out_dir)
    torch.manual_seed(s.seed)
    with warnings.catch_warnings(), _signals_restored():
        warnings.filterwarnings("ignore", message=".*(exhausted|override|beginning new epoch).*")
        warnings.filterwarnings("ignore", category=UserWarning, module=r"sae_lens\..*")
        runner = LanguageModelSAETrainingRunner(cfg, override_model=model, override_dataset=token_dataset(tokens))
        recorder = _CurveRecorder(runner.sae, s)
        runner.sae.training_forward_pass = recorder  # type: ignore[method-assign]
        try:
            sae = runner.run()
        finally:
            del runner.sae.training_forward_pass  # the class's method again
    return sae, recorder.curves


def _hook_shape(model, hook: str, tokens: torch.Tensor) -> tuple[int, ...]:
    shape: tuple[int, ...] = ()

    def grab(act, hook):  # noqa: ARG001
        nonlocal shape
        shape = tuple(act.shape)

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(hook, grab)], return_type=None)
    return shape


def sae_hooks(model, tokens: torch.Tensor) -> dict[str, int]:
    """Hooks an SAE can be trained on: every hook point whose activation is one vector per position
    (``[batch, pos, d]`` with d > 1, not all zero), with that width ``d``. Attention patterns and per-head
    hooks are left out."""
    shapes: dict[str, tuple[int, ...]] = {}

    def grab(act, hook):
        if bool(act.ne(0).any()):  # e.g. hook_pos_embed of a model without positions: nothing to learn
            shapes[hook.name] = tuple(act.shape)

    with torch.no_grad():
        model.run_with_hooks(tokens[:1], fwd_hooks=[(lambda name: True, grab)], return_type=None)
    return {name: s[-1] for name, s in shapes.items() if len(s) == 3 and s[1] == tokens.shape[1] and s[-1] > 1}
