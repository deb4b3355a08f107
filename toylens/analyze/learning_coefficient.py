"""The local learning coefficient (LLC; Lau et al. 2023) of a model on its run's task loss, by SGLD with devinterp
(``pip install 'toylens[devinterp]'``), with a chain-health check that turns a bad sampler setting into a warning
naming the ``llc.*`` key to change; and the LLC at every saved checkpoint (``llc_over_checkpoints``).

    res = toylens.analyze.llc(model, task)  # .llc_mean, .llc_std, .loss_trace [chain, draw], .health
    res = toylens.analyze.llc_over_checkpoints(run)  # .steps, .llc_mean [step], .loss_trace [step, chain, draw]

In a report: ``toylens-analyze run=<dir> over=checkpoints dynamics.analyses=[llc]`` (settings: ``llc.*``, this
module's ``LLCConfig``), beside the loss, head scores and circuit edges on one step axis
(toylens/report/development.py).

The estimator is devinterp's: ``n·β · (mean loss over the chain - loss at the checkpoint)`` with the chain drawn
from the tempered, localised posterior ``exp(-n·β L(w) - γ/2 |w - w*|²)``. The loss ``L`` is the task's own: the
cross-entropy of ``targets`` where ``loss_mask`` is true, over ``n_rows`` rows the task samples from ``seed``
(its training distribution), the same rows at every checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from toylens.analyze.chain_health import GradNorms, chain_health, watched
from toylens.result import Result

INSTALL_HINT = "the LLC needs devinterp: pip install 'toylens[devinterp]' (devinterp==2.0.1)"


@dataclass
class LLCConfig:
    """The ``llc.*`` keys. n·β and γ measured on experiment=induction_heads (2 layers x 4 heads, d_model 64, 42k
    parameters; benchmarks/README.md, "LLC over checkpoints"): a trained checkpoint (loss 0.17) sits in a sharp
    minimum, so a small n·β (30) or γ (100) lets the chain climb to loss 1-4 and the estimate follows γ, not the
    model; n·β = γ = 1000 with ε = 1e-4 keeps the chain within ~0.03 nats of the checkpoint and its trace flat
    after the first ~20 draws, at every checkpoint of that run. ε = 1e-4 blows up on experiment=grokking's
    weight-decayed model (loss 1e30 within 64 draws), hence ``lr=None``: the largest ε of ``LR_LADDER`` whose
    pilot chain at the (last) checkpoint stays healthy, and ``num_draws=None``: as many draws as keep ε x draws
    (the chain's SGLD time) at 64 x 1e-4."""

    lr: float | None = None  # SGLD step size ε; null: calibrated (LR_LADDER), the health check says when it is wrong
    n_beta: float = 1000.0  # n·β, the inverse temperature times the sample size
    localization: float = 1000.0  # γ, the pull back to the checkpoint's weights
    num_chains: int = 3  # independent chains (their spread is llc_std)
    num_draws: int | None = None  # SGLD steps per chain, one draw each; null: 64 x (1e-4 / ε), whole epochs
    batch_size: int = 32  # rows per SGLD step
    # The loss is the mean over these rows: the init loss is read on all of them and each chain cycles through
    # whole epochs of them, so minibatch noise cancels out of mean - init instead of being multiplied by n·β.
    n_rows: int = 512  # rows of the task's training distribution (fixed seed), the same at every checkpoint
    seed: int = 0  # the rows (task.sample) and the chains' noise (devinterp's init_seed)
    burnin: int = 0  # devinterp averages every step, burn-in included (as Lau et al.'s estimator)
    components: bool = False  # over checkpoints: also the LLC of each head's and each MLP's weights alone


LR_LADDER = (1e-4, 3e-5, 1e-5, 3e-6, 1e-6)  # lr=None tries these in turn (pilot: 1 chain, 64 draws)
SGLD_TIME = 64 * 1e-4  # num_draws=None: draws x ε held at this


def auto_draws(lr: float, n_rows: int, batch_size: int) -> int:
    """Draws that keep ε x draws at ``SGLD_TIME``, rounded up to whole epochs of the rows (at least 64)."""
    epoch = max(1, n_rows // batch_size)
    want = max(64, math.ceil(SGLD_TIME / lr - 1e-9))
    return epoch * math.ceil(want / epoch)


def _require_devinterp():
    import logging

    try:
        import devinterp  # noqa: F401
        from devinterp.slt.llc import compute_llc
        from devinterp.slt.sampling import sample
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(INSTALL_HINT) from e
    # its INFO lines (zarr stores, thread pools, timings: several per checkpoint) would reach the CLI's stdout under
    # Hydra's logging set-up
    logging.getLogger("devinterp").setLevel(logging.WARNING)
    return sample, compute_llc


def task_rows(task, n_rows: int, seed: int):
    """``n_rows`` rows of ``task`` from a fixed seed (CPU), packed as devinterp's ``input_ids``: tokens,
    targets and loss_mask side by side (``[n_rows, 3 * seq_len]``), and a loss function that unpacks them."""
    from datasets import Dataset

    b = task.sample(n_rows, torch.Generator().manual_seed(seed))
    n = b.tokens.shape[1]
    if b.targets.shape != b.tokens.shape:
        raise ValueError(f"task {task.name!r}: targets {tuple(b.targets.shape)} are not [batch, pos]")
    ids = torch.cat([b.tokens.long(), b.targets.long(), b.loss_mask.long()], 1)
    return Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch"), n


def masked_loss_fn(seq_len: int):
    """devinterp's ``loss_fn(model, input_ids) -> [batch, width - 1]``: the task's masked cross-entropy, spread
    so that its mean (what devinterp averages and differentiates) is the masked mean over the batch. Runs on the
    fused engine when the model fits it (2-3x faster than HookedTransformer's forward here)."""
    from toylens.model.eligibility import fast_path_reason
    from toylens.model.fused import forward

    def loss_fn(model, input_ids: Tensor) -> Tensor:
        n = seq_len
        tok, tgt, mask = input_ids[:, :n], input_ids[:, n:2 * n], input_ids[:, 2 * n:].bool()
        logits = model(tok, return_type="logits") if fast_path_reason(model) else forward(model, tok)
        nll = F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten(), reduction="none").reshape(tok.shape)
        per_row = (nll * mask).sum(1) * len(tok) / mask.sum().clamp(min=1)
        return per_row[:, None].expand(-1, input_ids.shape[1] - 1)

    return loss_fn


@dataclass
class LLCResult(Result):
    """One LLC estimate: mean and spread over chains, each chain's estimate and loss trace ``[chain, draw]``,
    the drift/noise ratio per chain, the settings, and the chain-health verdict (``health["warnings"]``)."""

    llc_mean: float
    llc_std: float
    llc_per_chain: list[float]
    init_loss: float
    loss_trace: Tensor  # [chain, draw]
    drift_ratio: list[float]  # per chain: median |drift| / |noise| per step
    settings: dict
    health: dict = field(default_factory=dict)
    n_params: int = 0

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["loss_trace"] = self.loss_trace.tolist()
        return d

    def figures(self) -> dict:
        from toylens.analyze import plots

        return {"llc/trace": plots.line(self.loss_trace, labels=[f"chain {i}" for i in range(len(self.loss_trace))],
                                        x=list(range(self.loss_trace.shape[1])), xaxis="draw", yaxis="loss",
                                        title=f"SGLD loss traces (init loss {self.init_loss:.4f})")}


@contextlib.contextmanager
def _sampler_quiet(enabled: bool, label: str, num_chains: int):
    """devinterp's per-chain bar (draws of each chain), relabelled "LLC <label> chain i/n", or silenced; and its
    ``gc.collect()`` before and after every chain skipped (0.25 s each here, a tenth of a checkpoint's LLC: the
    chain's model copy is freed by reference counting)."""
    import devinterp.slt.sampler as sampler

    orig, orig_gc = sampler.trange, sampler._gc_and_empty_cache

    def trange(*args, desc: str = "", **kw):
        chain = desc.replace("Chain ", "")
        return orig(*args, desc=f"LLC {label} chain {int(chain) + 1}/{num_chains} (draws)", disable=not enabled,
                    **{**kw, "leave": False})

    sampler.trange, sampler._gc_and_empty_cache = trange, lambda: None
    try:
        yield
    finally:
        sampler.trange, sampler._gc_and_empty_cache = orig, orig_gc


def llc(model: torch.nn.Module, task, cfg: LLCConfig | None = None, *, progress: bool = False, label: str = "",
        param_masks: dict | None = None, dataset=None, loss_fn=None, device: str | None = None,
        **overrides) -> LLCResult:
    """The LLC of ``model`` at its current weights on ``task``'s masked loss (``LLCConfig``; keyword overrides,
    e.g. ``lr=3e-4``). ``param_masks``: devinterp's ``{param name: mask or None}``, the weights that move (the
    per-component LLC); default all. ``dataset``/``loss_fn``: devinterp's, for a model that is not a task's."""
    sample, compute_llc = _require_devinterp()
    cfg = LLCConfig(**{**asdict(cfg or LLCConfig()), **overrides})
    if dataset is None:
        dataset, n = task_rows(task, cfg.n_rows, cfg.seed)
        loss_fn = masked_loss_fn(n)
    cfg, pilots = resolve_settings(cfg, model, dataset, loss_fn, param_masks, device)
    n_rows = len(dataset)
    init_batches = max(1, n_rows // cfg.batch_size)
    device = device or str(next(model.parameters()).device)
    was_training = model.training
    if param_masks is None:
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    else:
        named = dict(model.named_parameters())
        n_params = sum(named[k].numel() if m is None else int(m.count_nonzero()) for k, m in param_masks.items())
    meter = GradNorms(model, param_masks)
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="toylens-llc-") as tmp, warnings.catch_warnings(record=True) as w, \
            _sampler_quiet(progress, label, cfg.num_chains):
        warnings.simplefilter("always")
        try:
            samples = sample(model, dataset, {}, lr=cfg.lr, n_beta=cfg.n_beta, localization=cfg.localization,
                             param_masks=param_masks, num_chains=cfg.num_chains, num_draws=cfg.num_draws,
                             batch_size=cfg.batch_size, num_burnin_steps=cfg.burnin,
                             num_init_loss_batches=init_batches, init_seed=cfg.seed, device=device,
                             output_path=f"{tmp}/samples.zarr", loss_fn=watched(loss_fn, meter))
        except (RuntimeError, AssertionError, ValueError) as e:
            # devinterp's bookkeeping raises (a NaN tolerance) on the step where the weights blow up
            samples = None
            failed.append(f"sampling stopped with {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        if samples is not None:
            out = compute_llc(samples)
            trace = torch.as_tensor(out.loss_trace.values, dtype=torch.float64)
            per_chain = [float(v) for v in out.llc_per_chain.values]
            init_loss, mean, std = float(out.init_loss), float(out.llc_mean), float(out.llc_std)
            samples.close()
        else:
            trace = torch.full((cfg.num_chains, cfg.num_draws), math.nan, dtype=torch.float64)
            per_chain = [math.nan] * cfg.num_chains
            init_loss, mean, std = math.nan, math.nan, math.nan
        failed += [str(x.message) for x in w if "Chain failed" in str(x.message)]
    model.train(was_training)
    ratio = meter.drift_ratio(cfg.lr, cfg.n_beta, n_params)
    ratio += [math.nan] * (cfg.num_chains - len(ratio))
    health = chain_health(trace, init_loss, ratio, failed)
    settings = {**asdict(cfg), "n_rows": n_rows, **({"lr_pilots": pilots} if pilots else {})}
    return LLCResult(llc_mean=mean, llc_std=std, llc_per_chain=per_chain, init_loss=init_loss, loss_trace=trace.float(),
                     drift_ratio=ratio, settings=settings, health=health, n_params=n_params)


def resolve_settings(cfg: LLCConfig, model, dataset, loss_fn, param_masks=None, device=None,
                     ) -> tuple[LLCConfig, list[dict]]:
    """``cfg`` with ``lr=None`` and ``num_draws=None`` made concrete. The step size: the first of ``LR_LADDER``
    whose pilot chain (1 chain, 64 draws, on ``model``) neither diverges nor takes steps large against its noise
    (the smallest when none does: the full run's health check then says so); returns the pilots tried
    (``[{"lr", "ok", "checks"}]``, empty when ``lr`` was given)."""
    pilots: list[dict] = []
    lr = cfg.lr
    if lr is None:
        for lr in LR_LADDER:
            r = llc(model, None, dataclasses.replace(cfg, lr=lr, num_chains=1, num_draws=64, burnin=0),
                    param_masks=param_masks, dataset=dataset, loss_fn=loss_fn, device=device)
            bad = [w["check"] for w in r.health["warnings"] if w["check"] in ("diverged", "step_size")]
            pilots.append({"lr": lr, "ok": not bad, "checks": bad})
            if not bad:
                break
    draws = cfg.num_draws if cfg.num_draws is not None else auto_draws(lr, len(dataset), cfg.batch_size)
    return dataclasses.replace(cfg, lr=lr, num_draws=draws), pilots


def component_masks(model) -> dict[str, dict]:
    """devinterp ``param_masks`` per component: each head ``L{l}H{h}`` (its rows of W_Q, W_K, W_V, W_O and b_Q,
    b_K, b_V) and each MLP ``MLP{l}`` (all its weights); the LLC restricted to those weights alone."""
    out: dict[str, dict] = {}
    named = dict(model.named_parameters())
    for layer in range(model.cfg.n_layers):
        for h in range(model.cfg.n_heads):
            masks = {}
            for w in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V"):
                name = f"blocks.{layer}.attn.{w}"
                if name in named and named[name].requires_grad:
                    m = torch.zeros_like(named[name], dtype=torch.bool)
                    m[h] = True
                    masks[name] = m
            out[f"L{layer}H{h}"] = masks
        if not model.cfg.attn_only:
            out[f"MLP{layer}"] = {k: None for k in named if k.startswith(f"blocks.{layer}.mlp.")}
    return out


@dataclass
class LLCDynamics(Result):
    """The LLC at each checkpoint: ``llc_mean``/``llc_std`` ``[step]``, the traces ``[step, chain, draw]``, the
    init loss per step, each step's chain-health warnings, and (``components=True``) the per-component LLC
    ``{component: [step]}``."""

    steps: list[int]
    llc_mean: Tensor
    llc_std: Tensor
    init_loss: Tensor
    loss_trace: Tensor
    warnings: dict[int, list[dict]]
    settings: dict
    components: dict[str, Tensor] = field(default_factory=dict)
    seconds_per_checkpoint: float = 0.0
    calibration_s: float = 0.0  # the step-size pilots (lr=None), once for all checkpoints

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["loss_trace"] = self.loss_trace.tolist()
        d["warnings"] = {str(k): v for k, v in self.warnings.items()}
        return d

    def to_xarray(self):
        """The traces as an ``xarray.Dataset`` (dims step, chain, draw), for ``dynamics/llc.zarr``."""
        import xarray as xr

        data = {"llc_mean": ("step", self.llc_mean.numpy()), "llc_std": ("step", self.llc_std.numpy()),
                "init_loss": ("step", self.init_loss.numpy()),
                "loss_trace": (("step", "chain", "draw"), self.loss_trace.numpy())}
        data |= {f"llc_{c}": ("step", v.numpy()) for c, v in self.components.items()}
        return xr.Dataset(data, coords={"step": self.steps},
                          attrs={k: str(v) for k, v in self.settings.items()})

    def diverged_steps(self) -> list[int]:
        """Checkpoints whose chains diverged (or whose estimate is not finite): their value means nothing."""
        return [s for i, s in enumerate(self.steps) if not math.isfinite(float(self.llc_mean[i]))
                or any(w["check"] == "diverged" for w in self.warnings.get(s, []))]

    def usable_mean(self) -> list[float]:
        """``llc_mean`` with the diverged checkpoints as NaN (a gap in a curve, left out of the stages)."""
        bad = set(self.diverged_steps())
        return [math.nan if s in bad else float(v) for s, v in zip(self.steps, self.llc_mean, strict=True)]

    def figures(self) -> dict:
        import plotly.graph_objects as go

        x = self.steps
        fig = go.Figure(go.Scatter(x=x, y=self.usable_mean(), mode="lines+markers", name="LLC",
                                   error_y=dict(type="data", array=self.llc_std.tolist(), visible=True)))
        for c, v in self.components.items():
            fig.add_trace(go.Scatter(x=x, y=v.tolist(), mode="lines", name=f"LLC {c}", line=dict(dash="dot")))
        bad = self.diverged_steps()
        fig.update_layout(title="Local learning coefficient per checkpoint (mean ± std over chains)"
                                + (f"; {len(bad)} diverged checkpoints left out" if bad else ""),
                          xaxis_title="step", yaxis_title="LLC")
        return {"llc/curve": fig}


def llc_over_checkpoints(run, steps: Sequence[int] | None = None, cfg: LLCConfig | None = None, *,
                         components: bool | None = None, device: str = "cpu", progress: bool = True,
                         **overrides) -> LLCDynamics:
    """``llc`` at every checkpoint of ``run`` (or ``steps``), on the same rows of its task, the same seeds;
    ``components`` (default ``cfg.components``): also each head's and MLP's LLC (``component_masks``)."""
    import time

    from tqdm.auto import tqdm

    cfg = LLCConfig(**{**asdict(cfg or LLCConfig()), **overrides})
    components = cfg.components if components is None else components
    steps = sorted(run.check_step(s) for s in (run.steps if steps is None else steps))
    dataset, n = task_rows(run.task, cfg.n_rows, cfg.seed)
    loss_fn = masked_loss_fn(n)
    # one step size and length for every checkpoint (comparable estimates), calibrated where the minimum is
    # usually sharpest: the last checkpoint
    t_cal = time.perf_counter()
    cfg, pilots = resolve_settings(cfg, run.model(steps[-1], device=device), dataset, loss_fn, device=device)
    t_cal = time.perf_counter() - t_cal
    rows, comps, warns = [], {}, {}
    t0 = time.perf_counter()
    for step in tqdm(steps, disable=not progress, desc="LLC over checkpoints"):
        model = run.model(step, device=device)
        r = llc(model, run.task, cfg, progress=progress, label=f"step {step}", dataset=dataset, loss_fn=loss_fn,
                device=device)
        rows.append(r)
        if r.health["warnings"]:
            warns[step] = r.health["warnings"]
        if components:
            for name, masks in component_masks(model).items():
                c = llc(model, run.task, cfg, param_masks=masks, dataset=dataset, loss_fn=loss_fn, device=device)
                comps.setdefault(name, []).append(c.llc_mean)
    secs = (time.perf_counter() - t0) / max(1, len(steps))
    return LLCDynamics(steps=steps, llc_mean=torch.tensor([r.llc_mean for r in rows]),
                       llc_std=torch.tensor([r.llc_std for r in rows]),
                       init_loss=torch.tensor([r.init_loss for r in rows]),
                       loss_trace=torch.stack([r.loss_trace for r in rows]), warnings=warns,
                       settings={**asdict(cfg), **({"lr_pilots": pilots} if pilots else {})},
                       components={k: torch.tensor(v) for k, v in comps.items()},
                       seconds_per_checkpoint=secs, calibration_s=t_cal)
