"""A fused forward pass for ``ablate_every_hook``: TransformerLens's math with one activation replaced.

``HookedTransformer.forward`` routes every activation through a hook point, einsums and fresh
allocations. For the plain models toylens trains (pre-norm blocks with LN, LNPre or no norm,
standard or no positional embedding, a plain MLP or none) this module computes the same function
on the model's own weights with fused kernels (``F.linear``, ``F.layer_norm``,
``scaled_dot_product_attention``) and reproduces TransformerLens's semantics at the hook points
that matter for one run:

* a *replaced* hook point gets exactly the value TransformerLens's hook would return (LN
  ``hook_scale`` and ``hook_normalized`` before the LN's ``w``/``b``, ``hook_attn_scores`` after
  the causal mask with ``-inf``, ``hook_pattern`` after the NaN guard, per-head ``hook_z``);
* an *observed* hook point (clean passes: means, resample values, the cached residual stream)
  sees the value its hook would see;
* what only feeds the replaced point is not computed (the attention before ``hook_z``, q and k
  before ``hook_pattern``, the LN before its ``hook_normalized``, ...).

Everything else runs fused. Which models this covers is decided by ``unsupported`` (and the
engine checks that exactly the expected hook points fire); the tests compare every mode and hook
against the naive ``run_with_hooks`` loop, so equality with TransformerLens is checked, not assumed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from toylens._compat import HookedTransformer
from toylens.analyze.ablation.plan import Job, evaluate_jobs, masked_positions, nll_and_correct
from toylens.data.base import Batch
from toylens.model.build import positional_embedding_type
from toylens.model.fused import _ACTS, supports

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
    """The hook points a forward pass of a supported model fires, in order (each once)."""
    c = model.cfg
    names = ["hook_embed", "hook_pos_embed"]
    norm = ("hook_scale", "hook_normalized") if c.normalization_type else ()
    for layer in range(c.n_layers):
        p = f"blocks.{layer}."
        names += [p + "hook_resid_pre", *(p + "ln1." + n for n in norm)]
        names += [p + "attn." + n for n in ("hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern",
                                            "hook_z")]
        names.append(p + "hook_attn_out")
        if not c.attn_only:
            names += [p + "hook_resid_mid", *(p + "ln2." + n for n in norm)]
            names += [p + "mlp.hook_pre", p + "mlp.hook_post", p + "hook_mlp_out"]
        names.append(p + "hook_resid_post")
    names += ["ln_final." + n for n in norm] + ["unembed.hook_in", "unembed.hook_out"]
    return names


def unsupported(model: HookedTransformer, fired: list[str]) -> str | None:
    """None when the fused path computes this model exactly as TransformerLens does, else why not."""
    c = model.cfg
    why = supports(model)
    checks = [
        (why is None, why),
        (c.dtype in (torch.float32, torch.float64), f"dtype={c.dtype}"),
        (not c.use_attn_result, "use_attn_result"),
        (not c.use_split_qkv_input and not c.use_attn_in, "split q/k/v inputs"),
        (not c.use_hook_mlp_in, "use_hook_mlp_in"),
        (not getattr(c, "use_hook_tokens", False), "use_hook_tokens"),
        (c.attention_dir == "causal", f"attention_dir={c.attention_dir}"),
        (not getattr(c, "use_qk_norm", False), "use_qk_norm"),
        (getattr(c, "num_experts", None) is None, "mixture of experts"),
        (c.original_architecture is None or c.original_architecture == "GPT2LMHeadModel"
         or not c.original_architecture, f"original_architecture={c.original_architecture}"),
        (list(fired) == hook_names(model), "hook points differ from the plain architecture's"),
    ]
    for ok, reason in checks:
        if not ok:
            return reason
    return None


class FusedModel:
    """The weights of ``model`` laid out for ``F.linear``; thread-safe (no state changes after init)."""

    def __init__(self, model: HookedTransformer):
        c = model.cfg
        self.n_layers, self.n_heads, self.d_head = c.n_layers, c.n_heads, c.d_head
        self.attn_only, self.eps, self.attn_scale = c.attn_only, c.eps, c.attn_scale
        self.norm = c.normalization_type  # "LN", "LNPre" or None
        self.act = None if c.attn_only else _ACTS[c.act_fn]
        self.act_ = torch.relu_ if c.act_fn == "relu" else self.act
        self.W_E = model.embed.W_E
        self.W_pos = model.pos_embed.W_pos if positional_embedding_type(model) != "none" else None
        n_dh = c.n_heads * c.d_head

        def ln(module) -> tuple[Tensor | None, Tensor | None]:
            return (module.w, module.b) if self.norm == "LN" else (None, None)

        self.blocks = []
        for blk in model.blocks:
            a = blk.attn
            w_qkv = torch.cat([a.W_Q, a.W_K, a.W_V], 0)  # [3 * head_index, d_model, d_head]
            b = dict(
                ln1=ln(getattr(blk, "ln1", None)),
                W_qkv=w_qkv.permute(0, 2, 1).reshape(3 * n_dh, c.d_model).contiguous(),
                b_qkv=torch.cat([a.b_Q, a.b_K, a.b_V], 0).reshape(3 * n_dh).contiguous(),
                W_O=a.W_O.reshape(n_dh, c.d_model).T.contiguous(),
                b_O=a.b_O,
            )
            b["W_V"], b["b_V"] = b["W_qkv"][2 * n_dh:], b["b_qkv"][2 * n_dh:]
            if not c.attn_only:
                m = blk.mlp
                b.update(ln2=ln(getattr(blk, "ln2", None)), W_in=m.W_in.T.contiguous(), b_in=m.b_in,
                         W_out=m.W_out.T.contiguous(), b_out=m.b_out)
            self.blocks.append(b)
        self.ln_final = ln(getattr(model, "ln_final", None))
        self.W_U, self.b_U = model.unembed.W_U.T.contiguous(), model.unembed.b_U
        # For the loss only: the unembedding padded to a multiple of 16 outputs, the extra ones
        # with weight 0 and bias -inf (exp(-inf) = 0: log-softmax and argmax are unchanged). MKL's
        # GEMM is 2-3x slower for some widths, e.g. d_vocab 300 (13 ms vs 5.5 ms at 304 on 12k rows).
        pad = -self.W_U.shape[0] % 16
        self.W_U_loss = torch.cat([self.W_U, self.W_U.new_zeros(pad, self.W_U.shape[1])])
        self.b_U_loss = torch.cat([self.b_U, self.b_U.new_full((pad,), -torch.inf)])
        self._causal: dict[tuple[int, torch.device], Tensor] = {}

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

    def _norm(self, call: Call, x: Tensor, wb: tuple[Tensor | None, Tensor | None], prefix: str) -> Tensor:
        if self.norm is None:
            return x
        w, b = wb
        scale_name, norm_name = prefix + "hook_scale", prefix + "hook_normalized"
        if call.target == norm_name:  # the LN itself is dead
            x = self._hook(call, norm_name, x)
        elif call.target == scale_name or scale_name in call.observed or norm_name in call.observed:
            x = x - x.mean(-1, keepdim=True)
            scale = self._hook(call, scale_name, (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
            x = self._hook(call, norm_name, x / scale)
        else:
            return F.layer_norm(x, x.shape[-1:], w, b, self.eps)
        return x if w is None else x * w + b

    def causal(self, n: int, device: torch.device) -> Tensor:
        key = (n, device)
        if key not in self._causal:
            self._causal[key] = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        return self._causal[key]

    # --- the model, piece by piece ---------------------------------------------------------------
    def embed(self, call: Call, tokens: Tensor) -> Tensor:
        x = self._hook(call, "hook_embed", F.embedding(tokens, self.W_E))
        if self.W_pos is None:  # positional "none": W_pos is zero, nothing to add
            return x
        pos = self.W_pos[: tokens.shape[1]].expand(tokens.shape[0], -1, -1)  # TL's hook sees [batch, pos, d_model]
        return x + self._hook(call, "hook_pos_embed", pos)

    def attention(self, call: Call, layer: int, x: Tensor) -> Tensor:
        """``hook_attn_out`` of block ``layer`` for residual input ``x``."""
        p, blk = f"blocks.{layer}.", self.blocks[layer]
        a, t = p + "attn.", call.target
        if t == p + "hook_attn_out" or (t == a + "hook_z" and call.head is None):
            z = None if t == p + "hook_attn_out" else call.value  # the whole attention is dead
        else:
            h = self._norm(call, x, blk["ln1"], p + "ln1.")
            z = self._z(call, a, blk, h)
        if z is not None:
            out = F.linear(self._hook(call, a + "hook_z", z).flatten(2), blk["W_O"], blk["b_O"])
        else:
            out = call.value
        return self._hook(call, p + "hook_attn_out", out)

    def _z(self, call: Call, a: str, blk: dict, h: Tensor) -> Tensor:
        n, dh, t = self.n_heads, self.d_head, call.target
        scores_name, pattern_name = a + "hook_attn_scores", a + "hook_pattern"
        if t in (scores_name, pattern_name):  # q and k are dead
            v = F.linear(h, blk["W_V"], blk["b_V"]).unflatten(-1, (n, dh))
            q = k = None
        else:
            q, k, v = F.linear(h, blk["W_qkv"], blk["b_qkv"]).unflatten(-1, (3, n, dh)).unbind(-3)
            q, k = self._hook(call, a + "hook_q", q), self._hook(call, a + "hook_k", k)
        v = self._hook(call, a + "hook_v", v)  # [batch, pos, head_index, d_head]
        explicit = t in (scores_name, pattern_name) or not {scores_name, pattern_name}.isdisjoint(call.observed)
        if not explicit:
            q, k, v = (u.transpose(1, 2) for u in torch.broadcast_tensors(q, k, v))
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / self.attn_scale)
            return z.transpose(1, 2)
        if t == pattern_name:
            pattern = call.value
        else:
            if t == scores_name:
                scores = call.value
            else:
                scores = q.transpose(1, 2) @ k.permute(0, 2, 3, 1) / self.attn_scale
                scores = scores.masked_fill(~self.causal(scores.shape[-1], scores.device), -torch.inf)
            scores = self._hook(call, scores_name, scores)
            pattern = scores.softmax(-1)
            pattern = torch.where(torch.isnan(pattern), 0.0, pattern)
        pattern = self._hook(call, pattern_name, pattern)
        return (pattern @ v.transpose(1, 2)).transpose(1, 2)

    def mlp(self, call: Call, layer: int, x: Tensor) -> Tensor:
        """``hook_mlp_out`` of block ``layer`` for residual input ``x`` (``hook_resid_mid``)."""
        p, blk, t = f"blocks.{layer}.", self.blocks[layer], call.target
        if t == p + "hook_mlp_out":
            out = call.value
        else:
            if t == p + "mlp.hook_post":
                post = call.value
            else:
                pre_name = p + "mlp.hook_pre"
                if t == pre_name:
                    post = self.act(call.value)
                else:
                    pre = F.linear(self._norm(call, x, blk["ln2"], p + "ln2."), blk["W_in"], blk["b_in"])
                    pre = self._hook(call, pre_name, pre)
                    # relu in place when nobody else holds ``pre`` (saves a pass over [rows, pos, d_mlp])
                    post = self.act_(pre) if pre_name not in call.observed else self.act(pre)
            out = F.linear(self._hook(call, p + "mlp.hook_post", post), blk["W_out"], blk["b_out"])
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
        x = self._hook(call, "unembed.hook_in", self._norm(call, x, self.ln_final, "ln_final."))
        if "unembed.hook_out" in call.observed:
            return self._hook(call, "unembed.hook_out", F.linear(x, self.W_U, self.b_U))[:, positions]
        if call.target == "unembed.hook_out":
            return call.value[:, positions]
        return F.linear(x[:, positions], self.W_U_loss, self.b_U_loss)

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
