"""One call from a run to a trained, evaluated SAE: task sequences -> SAELens training -> evaluation on held-out
sequences -> latent cards. ``SAEResult`` holds every number the report shows (and ``to_dict`` for JSON)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from toylens.analyze.sae.evaluate import SAEEval, evaluate_sae, hook_activations, latent_acts, latent_density
from toylens.analyze.sae.latents import LatentCard, latent_cards, top_latents
from toylens.analyze.sae.train import Curves, SAESettings, train_sae

TRAIN_SEED_OFFSET = 7_000_000  # the SAE's training sequences use their own seeds, far from training/eval seeds
EVAL_SEED = 20_240_015


@dataclass
class SAEResult:
    hook: str
    step: int  # the run's checkpoint the SAE was trained on
    d_in: int
    settings: SAESettings
    curves: Curves
    eval: SAEEval
    density: list[float]  # per latent, on the evaluation sequences
    cards: list[LatentCard]
    train_seconds: float  # wall time of SAELens's training run (activations from the model + SAE steps)
    train_cpu_seconds: float  # CPU time of this process over the same run (all threads)
    n_train_activations: int
    sae: Any = None  # the SAELens SAE (loaded back from disk when one was written)

    @property
    def seconds_per_million(self) -> float:
        return self.train_seconds / max(self.n_train_activations, 1) * 1e6

    def to_dict(self) -> dict:
        return {"hook": self.hook, "step": self.step, "d_in": self.d_in, "settings": self.settings.to_dict(),
                "eval": self.eval.to_dict(), "train_seconds": self.train_seconds,
                "train_cpu_seconds": self.train_cpu_seconds,
                "n_train_activations": self.n_train_activations, "seconds_per_million": self.seconds_per_million,
                "curves": self.curves.to_dict(), "density": self.density, "cards": [c.to_dict() for c in self.cards]}


def load_sae(path: str | Path):
    """An SAE SAELens saved (``cfg.json`` + ``sae_weights.safetensors``), for inference on the CPU."""
    from sae_lens import SAE

    return SAE.load_from_disk(str(path), device="cpu")


def sae_of_run(model, task, hook: str, settings: SAESettings, out_dir: Path | None = None, step: int = 0,
               eval_sequences: int = 512, n_cards: int = 8) -> SAEResult:
    """Train an SAE on ``hook`` of ``model`` over ``task``'s sequences (SAELens writes it to ``out_dir`` when
    given, and the SAE evaluated is the one read back from there), then evaluate it on ``eval_sequences``
    held-out sequences and make cards for its ``n_cards`` top latents."""
    g = torch.Generator().manual_seed(settings.seed + TRAIN_SEED_OFFSET)
    tokens = task.sample(settings.n_sequences(task.seq_len), g).tokens
    t0, c0 = time.perf_counter(), time.process_time()
    sae, curves = train_sae(model, tokens, hook, settings, out_dir)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    if out_dir is not None:
        sae = load_sae(out_dir)
    sae.eval()
    batch = task.eval_set(eval_sequences, EVAL_SEED, "cpu")
    acts = hook_activations(model, hook, batch.tokens)
    with torch.no_grad():
        feats = latent_acts(sae, acts)
    ev = evaluate_sae(model, sae, hook, batch, acts, feats)
    cards = latent_cards(model, sae, hook, batch, feats, top_latents(feats, sae, n_cards), task.token_names,
                         ce_clean=ev.ce_clean)
    return SAEResult(hook=hook, step=step, d_in=acts.shape[-1], settings=settings, curves=curves, eval=ev,
                     density=latent_density(feats).tolist(), cards=cards, train_seconds=seconds, train_cpu_seconds=cpu,
                     n_train_activations=settings.steps * settings.batch_tokens, sae=sae)
