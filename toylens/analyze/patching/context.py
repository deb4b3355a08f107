"""What a patching sweep resumes from: the truncated prompts, the clean and corrupted caches, and
the per-prompt metric of the clean and corrupted runs."""

from __future__ import annotations

import dataclasses

import torch
from jaxtyping import Float, Int
from torch import Tensor

from toylens._compat import HookedTransformer
from toylens.analyze.metrics import METRICS, READS_ONLY_ANSWERS, Metric, MetricError
from toylens.analyze.pairs import PAD, PromptPairs
from toylens.analyze.patching.blocks import FastBlocks
from toylens.analyze.patching.kinds import Kind, PatchingError, hook_name
from toylens.model.eligibility import fast_path_reason
from toylens.model.unembed import Unembed


class Context:
    """Everything a sweep resumes from: truncated prompts, the clean and corrupted caches, baselines.

    Build once and pass to several sweeps (like ``clean_cache`` in ``transformer_lens.patching``).
    """

    def __init__(self, model: HookedTransformer, pairs: PromptPairs, metric: Metric, engine: str = "auto"):
        if engine not in ("auto", "fast", "hooks"):
            raise PatchingError(f"engine={engine!r}; choose 'auto', 'fast' or 'hooks'")
        why = fast_path_reason(model)
        if engine == "fast" and why:
            raise PatchingError(f"engine='fast' does not cover this model ({why}); use engine='auto'")
        if model.cfg.positional_embedding_type == "shortformer":
            raise PatchingError("shortformer positional embeddings are not supported by the patching engine")
        self.fast = engine != "hooks" and why is None
        self.model, self.metric = model, metric
        self.pairs = pairs.to(model.cfg.device)
        p = self.pairs
        self.b, self.n_pos = p.batch_size, p.n_pos
        # Causal attention: positions after the last answer never reach the metric, and before a prompt's
        # first changed token the clean and corrupted runs agree. Bidirectional: every position counts.
        self.causal = model.cfg.attention_dir == "causal"
        self.T = int(p.answer_pos.max()) + 1 if self.causal else self.n_pos
        self.tokdiff = p.clean != p.corrupted  # [batch, pos]
        any_diff = self.tokdiff.any(1)
        self.first_diff = torch.where(any_diff, self.tokdiff.int().argmax(1), self.n_pos)  # [batch]
        self._blocks: FastBlocks | None = None
        # metric-only unembedding: the answer tokens' columns, answers renumbered into them
        self.columns: Tensor | None = None
        self.metric_pairs = p
        if metric in READS_ONLY_ANSWERS:
            cols = torch.unique(p.answers[p.answers != PAD])
            remap = torch.searchsorted(cols, p.answers.clamp_min(0))
            self.columns = cols
            self.metric_pairs = dataclasses.replace(p, answers=torch.where(p.answers == PAD, PAD, remap))
        self._unembed: Unembed | None = None
        self.clean: dict[str, list[Tensor]] = {}
        self.corr: dict[str, list[Tensor]] = {}
        self.clean_rows: Tensor | None = None  # per-prompt metric, clean run
        self.corr_rows: Tensor | None = None

    @property
    def blocks(self) -> FastBlocks:
        if self._blocks is None:
            self._blocks = FastBlocks(self.model)
        return self._blocks

    # --- caches ----------------------------------------------------------------------------------
    def cache_acts(self, kinds: list[Kind]) -> tuple[set[str], set[str]]:
        """Activation names the clean and the corrupted cache must hold for ``kinds``."""
        rot = self.model.cfg.positional_embedding_type == "rotary"
        clean, corr = set(), {"resid_post"}
        for kind in kinds:
            act = kind.act
            if not self.fast:
                clean.add(act)
                corr.add("resid_pre")
                continue
            clean.add({"q": "rot_q", "k": "rot_k"}.get(act, act) if rot else act)
            corr |= {"rot_k" if rot else "k", "v"}
            if act in ("resid_pre", "attn_out", "z", "q", "k", "v", "pattern"):
                corr.add("resid_pre")
            if act == "resid_pre":
                corr.add("rot_q" if rot else "q")
            if act == "mlp_out":
                corr.add("resid_mid")
            if act in ("z", "q", "k", "v", "pattern"):
                corr.add("z")
            if act == "k":
                corr.add("rot_q" if rot else "q")
            if act == "v" or kind.name == "pattern_dest_src":
                corr.add("pattern")
        return clean, corr

    def prepare(self, kinds: list[Kind]) -> None:
        """Run clean and corrupted prompts once (one batch, positions ``< T``) caching what ``kinds`` need."""
        model, L = self.model, self.model.cfg.n_layers
        for kind in kinds:
            if model.cfg.attn_only and kind.act in ("resid_mid", "mlp_out"):
                raise PatchingError(f"kind={kind.name!r}: an attention-only model has no {kind.act}; "
                                    "choose another kind (block_every needs an MLP)")
        clean, corr = self.cache_acts(kinds)
        need = {a for a in clean if a not in self.clean} | {a for a in corr if a not in self.corr}
        if not need and self.clean_rows is not None:
            return
        need |= {"resid_post"}
        tokens = torch.cat([self.pairs.clean, self.pairs.corrupted])[:, :self.T]
        with torch.inference_mode():
            if self.fast:  # the same forward, fused (what the sweeps resume with)
                cache = self.blocks.run_with_cache(tokens, need)
            else:
                names = {hook_name(a, layer) for a in need for layer in range(L)}
                _, tl_cache = model.run_with_cache(tokens, names_filter=lambda n: n in names, return_type=None)
                cache = {a: [tl_cache[hook_name(a, layer)] for layer in range(L)] for a in need}
            for act, per_layer in cache.items():
                self.clean[act] = [t[:self.b] for t in per_layer]
                self.corr[act] = [t[self.b:] for t in per_layer]
            del cache
            rows = torch.arange(self.b, device=tokens.device)
            a = self.pairs.answer_pos
            self.clean_rows = self.metric_rows(self.clean["resid_post"][L - 1][rows, a], rows)
            self.corr_rows = self.metric_rows(self.corr["resid_post"][L - 1][rows, a], rows)

    def metric_rows(self, resid: Float[Tensor, "n d_model"], rows: Int[Tensor, " n"]) -> Float[Tensor, " n"]:
        """The metric of each item from its final residual at the answer position."""
        logits = self.unembed(resid)
        p = self.metric_pairs
        if self.metric in METRICS.values():  # they read the answers alone: skip PromptPairs' checks
            sub = _Rows(p.answers[rows])
        elif rows.numel() == p.batch_size and bool((rows == torch.arange(p.batch_size, device=rows.device)).all()):
            sub = p
        else:
            sub = PromptPairs(p.clean[rows], p.corrupted[rows], p.answer_pos[rows], p.answers[rows])
        values = self.metric(logits, sub)
        if not isinstance(values, Tensor) or values.shape != rows.shape:
            raise MetricError(f"metric: must return one value per prompt, shape ({len(rows)},); got "
                              f"{tuple(getattr(values, 'shape', ()))} (a scalar? drop the mean over prompts)")
        return values.double()

    def unembed(self, resid: Float[Tensor, "n d_model"]) -> Tensor:
        """Logits at the answer positions (only the answers' columns for metrics that read nothing else)."""
        if self._unembed is None:
            self._unembed = Unembed(self.model, columns=self.columns)
        return self._unembed(resid)


@dataclasses.dataclass(frozen=True)
class _Rows:
    """The answers of some prompts: all a built-in metric reads of ``PromptPairs``."""

    answers: Tensor

    @property
    def batch_size(self) -> int:
        return self.answers.shape[0]
