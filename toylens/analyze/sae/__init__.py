"""Sparse autoencoders on a toylens run's activations, trained by SAELens (the optional ``toylens[sae]`` extra).
``sae_of_run`` trains one on any hook, evaluates it (explained variance, L0, CE loss recovered), makes latent cards."""

from toylens.analyze.sae.evaluate import (
    SAEEval,
    ce_loss_recovered,
    evaluate_sae,
    hook_activations,
    splice_hook,
    spliced_loss,
    task_ce,
)
from toylens.analyze.sae.latents import LatentCard, latent_cards, promoted_tokens, top_latents
from toylens.analyze.sae.pipeline import SAEResult, load_sae, sae_of_run
from toylens.analyze.sae.train import Curves, SAESettings, sae_hooks, train_sae

__all__ = ["Curves", "LatentCard", "SAEEval", "SAEResult", "SAESettings", "ce_loss_recovered", "evaluate_sae",
           "hook_activations", "latent_cards", "load_sae", "promoted_tokens", "sae_hooks", "sae_of_run",
           "splice_hook", "spliced_loss", "task_ce", "top_latents", "train_sae"]
