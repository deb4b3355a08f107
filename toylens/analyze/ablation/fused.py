"""``ablate_every_hook`` on the fused engine: TransformerLens's hook semantics for one replaced activation.

A *replaced* hook point gets the value TransformerLens's hook would return; an *observed* one (means,
resample values, cached residuals) sees what its hook would see; what only feeds the replaced point is
not computed. The math is ``toylens.model.fused.Engine``'s; tests compare every mode and hook with the
naive ``run_with_hooks`` loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from toylens._compat import HookedTransformer
from toylens.analyze.ablation.plan import Job, evaluate_jobs, masked_positions, nll_and_correct
from toylens.data.base import Batch
from toylens.model.fused import Engine

Observer = Callable[[str, Tensor], None]


@dataclasses.dataclass(frozen=True)
class Call:
    """What one run replaces (``target`` with ``value``, or one ``head`` of it) and observes."""

    target: str | None = None
    value: Tensor | None = None  # batch-constant values have a batch dimension of 1
    head: int | None = None
    observe: Observer | None = None
    observed: frozenset[str] = frozenset()


def hook_names(model: HookedTransformer) -> list[str]:
    """The hook points a forward pass of an engine model fires, in order (each once)."""
    c = model.cfg
    rotary = c.positional_embedding_type == "rotary"
    names = ["hook_embed"] + ([] if rotary else ["hook_pos_embed"])
    norm = ("hook_scale", "hook_normalized") if c.normalization_type else ()
    for layer in range(c.n_layers):
        p = f"blocks.{layer}."
        names += [p + "hook_resid_pre", *(p + "ln1." + n for n in norm)]
        names += [p + "attn." + n for n in ("hook_q", "hook_k", "hook_v")]
        names += [p + "attn." + n for n in ("hook_rot_q", "hook_rot_k") if rotary]
        names += [p + "attn." + n for n in ("hook_attn_scores", "hook_pattern", "hook_z")]
        names.append(p + "hook_attn_out")
        if not c.attn_only:
            names += [p + "hook_resid_mid", *(p + "ln2." + n for n in norm)]
            names += [p + "mlp.hook_pre", p + "mlp.hook_post", p + "hook_mlp_out"]
        names.append(p + "hook_resid_post")
    names += ["ln_final." + n for n in norm] + ["unembed.hook_in", "unembed.hook_out"]
    return names


class FusedModel:
    """The engine's pieces with hook semantics on top; thread-safe (no state changes after init)."""

    def __init__(self, model: HookedTransformer):
        self.eng = e = Engine(model)
        self.n_layers, self.attn_only, self.rotary = e.n_layers, e.attn_only, e.rotary
        self.W_E = e.W_E
        self.loss_unembed = e.loss_unembed()

    # --- hook semantics --------------------------------------------------------------------------
    @staticmethod
    def _hook(call: Call, name: str, act: Tensor) -> Tensor:
        if call.target == name:
            if call.head is None:
                act = call.value
            else:  # one head of hook_z: [batch, pos, head_index, d_head]
                act = act.clone()
                act[:, :, call.head] = call.value[:, :, call.head]
        if call.observe is not None and name in call.observed:
            call.observe(name, act)
        return act

    def _norm(self, call: Call, x: Tensor, ln: tuple, prefix: str) -> Tensor:
        if self.eng.norm_type is None:
            return x
        scale_name, norm_name = prefix + "hook_scale", prefix + "hook_normalized"
        if call.target == norm_name:  # the norm itself is dead
            x = self._hook(call, norm_name, x)
        elif call.target == scale_name or scale_name in call.observed or norm_name in call.observed:
            x, scale = self.eng.norm_parts(x)
            x = self._hook(call, norm_name, x / self._hook(call, scale_name, scale))
        else:
            return self.eng.norm(x, ln)
        return self.eng.norm_affine(x, ln)

    # --- the model, piece by piece ---------------------------------------------------------------
    def embed(self, call: Call, tokens: Tensor) -> Tensor:
        x = self._hook(call, "hook_embed", torch.nn.functional.embedding(tokens, self.eng.W_E))
        w_pos = self.eng.W_pos
        if w_pos is None:  # rotary, or positional "none" (W_pos is zero): nothing to add unless replaced
            if self.rotary or "hook_pos_embed" not in (call.target, *call.observed):
                return x
            w_pos = x.new_zeros(x.shape[1:])
        pos = w_pos[: tokens.shape[1]].expand(tokens.shape[0], -1, -1)  # TL's hook: [batch, pos, d_model]
        return x + self._hook(call, "hook_pos_embed", pos)

    def attention(self, call: Call, layer: int, x: Tensor) -> Tensor:
        """``hook_attn_out`` of block ``layer`` for residual input ``x``."""
        p = f"blocks.{layer}."
        a, t = p + "attn.", call.target
        if t == p + "hook_attn_out" or (t == a + "hook_z" and call.head is None):
            z = None if t == p + "hook_attn_out" else call.value  # the whole attention is dead
        else:
            h = self._norm(call, x, self.eng.layers[layer].ln1, p + "ln1.")
            z = self._z(call, layer, a, h)
        out = self.eng.attn_out(layer, self._hook(call, a + "hook_z", z)) if z is not None else call.value
        return self._hook(call, p + "hook_attn_out", out)

    def _z(self, call: Call, layer: int, a: str, h: Tensor) -> Tensor:
        eng, t = self.eng, call.target
        scores_name, pattern_name = a + "hook_attn_scores", a + "hook_pattern"
        if t in (scores_name, pattern_name):  # q and k are dead
            v, q, k = eng.project(layer, h, "v"), None, None
        else:
            q, k, v = eng.project(layer, h).unbind(-3)
            q, k = self._hook(call, a + "hook_q", q), self._hook(call, a + "hook_k", k)
            if self.rotary:
                q = self._hook(call, a + "hook_rot_q", eng.rotate(layer, q))
                k = self._hook(call, a + "hook_rot_k", eng.rotate(layer, k))
        v = self._hook(call, a + "hook_v", v)  # [batch, pos, head_index, d_head]
        explicit = t in (scores_name, pattern_name) or not {scores_name, pattern_name}.isdisjoint(call.observed)
        if not explicit:
            return eng.attention(layer, *torch.broadcast_tensors(q, k, v))
        if t == pattern_name:
            pattern = call.value
        else:
            scores = self._hook(call, scores_name, call.value if t == scores_name else eng.scores(layer, q, k))
            pattern = eng.pattern(scores)
        return eng.mix(self._hook(call, pattern_name, pattern), v)

    def mlp(self, call: Call, layer: int, x: Tensor) -> Tensor:
        """``hook_mlp_out`` of block ``layer`` for residual input ``x`` (``hook_resid_mid``)."""
        p, eng, t = f"blocks.{layer}.", self.eng, call.target
        if t == p + "hook_mlp_out":
            out = call.value
        else:
            if t == p + "mlp.hook_post":
                post = call.value
            else:
                pre_name = p + "mlp.hook_pre"
                if t == pre_name:
                    post = eng.act(call.value)
                else:
                    pre = eng.mlp_pre(layer, self._norm(call, x, eng.layers[layer].ln2, p + "ln2."))
                    pre = self._hook(call, pre_name, pre)
                    # in place when nobody else holds ``pre``
                    post = eng.act_(pre) if pre_name not in call.observed else eng.act(pre)
            out = eng.mlp_out(layer, self._hook(call, p + "mlp.hook_post", post))
        return self._hook(call, p + "hook_mlp_out", out)

    def blocks_from(self, call: Call, x: Tensor, layer: int, mlp_half: bool = False) -> Tensor:
        """Run blocks ``layer..`` on ``x`` (``hook_resid_pre`` of ``layer``, or its ``hook_resid_mid``
        when ``mlp_half``); returns the final residual stream."""
        for lay in range(layer, self.n_layers):
            p = f"blocks.{lay}."
            if not (lay == layer and mlp_half):
                x = self._hook(call, p + "hook_resid_pre", x)
                x = x + self.attention(call, lay, x)
                if self.attn_only:
                    x = self._hook(call, p + "hook_resid_post", x)
                    continue
                x = self._hook(call, p + "hook_resid_mid", x)
            x = self._hook(call, p + "hook_resid_post", x + self.mlp(call, lay, x))
        return x

    def unembed(self, call: Call, x: Tensor, positions: slice | Tensor) -> Tensor:
        """Logits at ``positions`` of the final residual stream ``x``."""
        x = self._hook(call, "unembed.hook_in", self._norm(call, x, self.eng.ln_final, "ln_final."))
        if "unembed.hook_out" in call.observed:
            return self._hook(call, "unembed.hook_out", self.eng.unembed.linear(x))[:, positions]
        if call.target == "unembed.hook_out":
            return call.value[:, positions]
        return self.loss_unembed.linear(x[:, positions])

    def forward(self, call: Call, tokens: Tensor, positions: slice | Tensor = slice(None)) -> Tensor:
        return self.unembed(call, self.blocks_from(call, self.embed(call, tokens), 0), positions)


# --- running the jobs -----------------------------------------------------------------------------
_MLP_HALF = ("hook_resid_mid", "ln2.hook_scale", "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_post",
             "hook_mlp_out")


class FusedRunner:
    """Runs every job on chunks of a batch through a :class:`FusedModel` (same interface as
    ``ablation_hooked.Runner``). Each run resumes from the chunk's clean residual stream at the
    hook's block (or its ``hook_resid_mid`` for the MLP half) and unembeds the loss positions only;
    a batch-constant value written into the residual stream runs the rest of the model on one row."""

    def __init__(self, model: HookedTransformer, jobs: list[Job], modes: list[str], sample_tokens: Tensor):
        self.fm, self.jobs, self.modes = FusedModel(model), jobs, modes
        self.names = list(dict.fromkeys(j.hook for j in jobs if j.same_as is None))
        shapes: dict[str, torch.Size] = {}
        every = frozenset(j.hook for j in jobs)
        self.fm.forward(Call(observe=lambda n, a: shapes.__setitem__(n, a.shape), observed=every), sample_tokens[:1])
        self.zero_shapes = {n: (1, *s[1:]) for n, s in shapes.items()}
        n_layers, attn_only = model.cfg.n_layers, model.cfg.attn_only
        self.kept = frozenset(f"blocks.{lay}.{h}" for lay in range(n_layers)
                              for h in ("hook_resid_pre",) + (() if attn_only else ("hook_resid_mid",)))

    def sums(self, tokens: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        self.fm.forward(Call(observe=lambda n, a: out.__setitem__(n, a.sum(0)), observed=frozenset(self.names)),
                        tokens)
        return {name: s.double() for name, s in out.items()}

    def activations(self, tokens: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        self.fm.forward(Call(observe=out.__setitem__, observed=frozenset(self.names)), tokens)
        return out

    def value(self, mode: str, job: Job, means, resampled) -> Tensor:
        if mode == "mean":
            return means[job.hook]
        if mode == "zero":
            return self.fm.W_E.new_zeros(self.zero_shapes[job.hook])
        return resampled[job.hook]

    def run(self, job: Job, value: Tensor, tokens: Tensor, kept: dict[str, Tensor], final: Tensor,
            positions: slice | Tensor) -> Tensor:
        """Logits at ``positions`` with ``job.hook`` (or one head of it) replaced by ``value``."""
        call, fm, hook = Call(target=job.hook, value=value, head=job.head), self.fm, job.hook
        if hook == "unembed.hook_out":
            return value[:, positions]
        if hook.startswith("blocks."):
            _, layer, suffix = hook.split(".", 2)
            layer = int(layer)
            if suffix == "hook_resid_post":
                final = fm.blocks_from(call, value, layer + 1)
            elif suffix in _MLP_HALF:
                x = value if suffix == "hook_resid_mid" else kept[f"blocks.{layer}.hook_resid_mid"]
                final = fm.blocks_from(call, x, layer, mlp_half=True)
            else:
                x = value if suffix == "hook_resid_pre" else kept[f"blocks.{layer}.hook_resid_pre"]
                final = fm.blocks_from(call, x, layer)
        elif hook in ("hook_embed", "hook_pos_embed"):
            final = fm.blocks_from(call, fm.embed(call, tokens), 0)
        return fm.unembed(call, final, positions)

    def evaluate(self, batch: Batch, means: dict[str, Tensor] | None, resample_tokens: Tensor | None) -> Tensor:
        positions = masked_positions(batch.loss_mask)
        kept: dict[str, Tensor] = {}
        clean = Call(observe=kept.__setitem__, observed=self.kept)
        final = self.fm.blocks_from(clean, self.fm.embed(clean, batch.tokens), 0)
        nll, correct = nll_and_correct(self.fm.unembed(Call(), final, positions), batch, positions)
        resampled = self.activations(resample_tokens) if resample_tokens is not None else None

        def run_one(job: Job, mode: str) -> tuple[Tensor, Tensor]:
            logits = self.run(job, self.value(mode, job, means, resampled), batch.tokens, kept, final, positions)
            return nll_and_correct(logits, batch, positions)

        return evaluate_jobs(self.jobs, self.modes, batch, nll, correct, run_one)
