"""Per-latent cards of an SAE on a toylens model: where a latent fires most (with token labels), which tokens
its decoder direction promotes through the unembedding (direct path), and the task loss when it is ablated."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from toylens.analyze.sae.evaluate import spliced_loss
from toylens.model.unembed import logit_directions

_RESID_LIKE = re.compile(r"^(hook_embed|hook_pos_embed|blocks\.\d+\.(hook_resid_\w+|hook_mlp_out|hook_attn_out))$")
_MLP_POST = re.compile(r"^blocks\.(\d+)\.mlp\.hook_post$")


@dataclass
class LatentCard:
    latent: int
    density: float  # fraction of activations where it fires
    max_activation: float
    top: list[dict]  # {"row", "pos", "activation", "token", "context"} for the top-activating positions
    promoted: list[dict]  # {"token", "logit"}: largest direct-path logit effects of a unit activation (or [])
    suppressed: list[dict]
    delta_loss: float  # task loss with the latent ablated minus the clean loss

    def to_dict(self) -> dict:
        return asdict(self)


def decoder_in_residual(model, sae, hook_name: str) -> Tensor | None:
    """Each latent's decoder direction as a residual-stream vector [d_sae, d_model]: itself for hooks that
    write the residual stream, through ``W_out`` for ``blocks.L.mlp.hook_post``; None for other hooks."""
    w_dec = sae.W_dec.detach().float()
    if _RESID_LIKE.match(hook_name) and w_dec.shape[1] == model.cfg.d_model:
        return w_dec
    m = _MLP_POST.match(hook_name)
    if m and w_dec.shape[1] == model.cfg.d_mlp:
        return w_dec @ model.blocks[int(m.group(1))].mlp.W_out.detach().float()
    return None


@torch.no_grad()
def promoted_tokens(model, sae, hook_name: str, k: int = 8) -> Tensor | None:
    """Direct-path logit effect of each latent's decoder direction on every token, relative to the mean over
    the vocabulary, through ``ln_final`` (its weight and centring; its scale frozen at 1) and ``W_U``
    (``toylens.model.unembed.logit_directions``): [d_sae, d_vocab], or None when the hook is not in the residual
    stream. Later layers are ignored (direct path only)."""
    resid = decoder_in_residual(model, sae, hook_name)
    if resid is None:
        return None
    vocab = torch.arange(model.cfg.d_vocab_out)
    directions, _ = logit_directions(model, vocab, relative_to_mean=True)
    return resid @ directions.float().T


def top_latents(feats: Tensor, sae, k: int) -> list[int]:
    """The ``k`` latents that carry most of the reconstruction: largest sum of activation x |W_dec row|."""
    f = feats.reshape(-1, feats.shape[-1])
    score = f.sum(0) * sae.W_dec.detach().norm(dim=-1)
    return [int(i) for i in score.argsort(descending=True)[:k] if score[i] > 0]


def _context(tokens: Tensor, row: int, pos: int, names: list[str], width: int = 4) -> str:
    lo = max(0, pos - width)
    toks = [names[t] if t < len(names) else str(t) for t in tokens[row, lo:pos + 1].tolist()]
    return ("… " if lo > 0 else "") + " ".join(toks[:-1] + [f"[{toks[-1]}]"])


@torch.no_grad()
def latent_cards(model, sae, hook_name: str, batch, feats: Tensor, latents: list[int], names: list[str],
                 n_top: int = 8, n_tokens: int = 6, ce_clean: float | None = None) -> list[LatentCard]:
    """A card per latent in ``latents``. ``feats`` [n, pos, d_sae] are the SAE's latents on ``batch``;
    ``names`` label token ids. ``delta_loss`` splices in ``x - f_j(x) W_dec[j]`` (see ``splice_hook``)."""
    density = (feats > 0).float().reshape(-1, feats.shape[-1]).mean(0)
    logits = promoted_tokens(model, sae, hook_name)
    clean = spliced_loss(model, sae, hook_name, batch, "clean") if ce_clean is None else ce_clean
    npos = feats.shape[1]
    cards = []
    for j in latents:
        a = feats[..., j].reshape(-1)
        vals, idx = a.topk(min(n_top, a.numel()))
        top = [{"row": int(i) // npos, "pos": int(i) % npos, "activation": float(v),
                "token": names[int(batch.tokens.reshape(-1)[i])],
                "context": _context(batch.tokens, int(i) // npos, int(i) % npos, names)}
               for v, i in zip(vals, idx, strict=True) if v > 0]
        promoted, suppressed = [], []
        if logits is not None:
            lj = logits[j]
            hi, lo = lj.topk(n_tokens), (-lj).topk(n_tokens)
            promoted = [{"token": names[int(t)], "logit": float(v)}
                        for v, t in zip(hi.values, hi.indices, strict=True)]
            suppressed = [{"token": names[int(t)], "logit": -float(v)}
                          for v, t in zip(lo.values, lo.indices, strict=True)]
        ablated = spliced_loss(model, sae, hook_name, batch, "ablate", latent=j)
        cards.append(LatentCard(latent=j, density=float(density[j]), max_activation=float(a.max()), top=top,
                                promoted=promoted, suppressed=suppressed, delta_loss=ablated - clean))
    return cards
