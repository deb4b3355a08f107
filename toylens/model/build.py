"""Every toylens model is built here, and only here; positional "none" is toylens's own setting (``W_pos`` zero
and frozen, recorded on the model and in ``model_config.json``). Details: docs/analyses.md."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Any

import torch

from toylens._compat import HookedTransformer, HookedTransformerConfig

POS_ATTR = "toylens_positional_embedding_type"


@contextlib.contextmanager
def quiet_transformer_lens():
    """Silence TransformerLens 3.x's "deprecated, removed in 4.0" warning, and only that, here only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*deprecated.*4\.0.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*from_pretrained is deprecated.*", category=DeprecationWarning)
        yield


def hooked_config(model_cfg: Any, d_vocab: int, n_ctx: int, seed: int, device: str = "cpu") -> HookedTransformerConfig:
    """HookedTransformerConfig from a toylens ModelConfig plus the task's vocabulary and length."""
    m = model_cfg
    kwargs: dict[str, Any] = dict(
        n_layers=m.n_layers,
        d_model=m.d_model,
        n_heads=m.n_heads,
        d_head=m.d_head,
        d_vocab=m.d_vocab if m.d_vocab is not None else d_vocab,
        n_ctx=m.n_ctx if m.n_ctx is not None else n_ctx,
        normalization_type=m.normalization_type,
        attn_only=m.attn_only,
        use_attn_result=m.use_attn_result,
        seed=m.seed if m.seed is not None else seed,
        device=device,
        positional_embedding_type="rotary" if m.positional_embedding_type == "rotary" else "standard",
    )
    if not m.attn_only:
        kwargs.update(d_mlp=m.d_mlp, act_fn=m.act_fn)
    if m.positional_embedding_type == "rotary":
        kwargs.update(rotary_dim=m.rotary_dim if m.rotary_dim is not None else m.d_head, rotary_base=m.rotary_base)
    if m.init_range is not None:
        kwargs["initializer_range"] = m.init_range
    return HookedTransformerConfig(**kwargs)


def make_model(cfg: HookedTransformerConfig, positional_embedding_type: str = "standard",
               init_weights: bool = True) -> HookedTransformer:
    """A HookedTransformer from its config; ``positional_embedding_type="none"`` zeroes and freezes W_pos."""
    if not init_weights:
        # seed=None: HookedTransformerConfig re-seeds every global RNG in __post_init__ when it
        # has a seed, and loading or folding weights must not reset the caller's random state.
        cfg = dataclasses.replace(cfg, init_weights=False, seed=None)
    with quiet_transformer_lens():
        model = HookedTransformer(cfg)
    if positional_embedding_type == "none":
        disable_positional_embedding(model)
    return model


def build_model(model_cfg: Any, d_vocab: int, n_ctx: int, seed: int, device: str = "cpu") -> HookedTransformer:
    """The model a training run starts from (initialised with ``seed``)."""
    cfg = hooked_config(model_cfg, d_vocab, n_ctx, seed, device)
    return make_model(cfg, model_cfg.positional_embedding_type)


def disable_positional_embedding(model: HookedTransformer) -> None:
    """Positional "none": W_pos zero and frozen, so no optimizer or weight decay can ever move it."""
    if model.cfg.positional_embedding_type != "standard":
        raise ValueError("positional embedding 'none' needs a standard-embedding HookedTransformer")
    with torch.no_grad():
        model.pos_embed.W_pos.zero_()
    model.pos_embed.W_pos.requires_grad_(False)
    setattr(model, POS_ATTR, "none")


def positional_embedding_type(model: HookedTransformer) -> str:
    """"none" for toylens's no-position models, else TransformerLens's own setting."""
    return getattr(model, POS_ATTR, None) or model.cfg.positional_embedding_type


# --- model_config.json --------------------------------------------------------------------------
def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    if isinstance(v, torch.device):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return repr(v)


def model_config_dict(model: HookedTransformer) -> dict:
    """The HookedTransformerConfig's constructor fields as JSON, plus toylens's own settings."""
    cfg = model.cfg
    d = {f.name: _jsonable(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    d["toylens"] = {"positional_embedding_type": positional_embedding_type(model)}
    return d


def model_from_config_dict(d: dict, device: str | None = None) -> HookedTransformer:
    """An uninitialised model (weights to be loaded) from ``model_config_dict`` output."""
    d = dict(d)
    extra = d.pop("toylens", {}) or {}
    if isinstance(d.get("dtype"), str):
        d["dtype"] = getattr(torch, d["dtype"])
    if device is not None:
        d["device"] = device
    names = {f.name for f in dataclasses.fields(HookedTransformerConfig) if f.init}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"model_config.json has fields HookedTransformerConfig does not know: {unknown}")
    d["seed"] = None  # weights are loaded, not initialised: leave the global RNGs alone
    with quiet_transformer_lens():
        cfg = HookedTransformerConfig(**d)
    return make_model(cfg, extra.get("positional_embedding_type", "standard"), init_weights=False)


# --- LayerNorm folding ----------------------------------------------------------------------------
def fold_layer_norm(model: HookedTransformer, center_writing_weights: bool = True,
                    center_unembed: bool = True, fold_value_biases: bool = True) -> HookedTransformer:
    """A new model with LayerNorm folded into the following weights (LN -> LNPre, RMS -> RMSPre).

    Uses TransformerLens's own ``load_and_process_state_dict``; positional "none" stays zero and
    frozen. The input model is not modified.
    """
    norm = model.cfg.normalization_type
    if norm not in ("LN", "RMS"):
        raise ValueError(f"fold_layer_norm needs an LN or RMS model, this one has normalization_type={norm!r}")
    folded_cfg = dataclasses.replace(model.cfg, normalization_type=norm + "Pre", init_weights=False, seed=None)
    folded = make_model(folded_cfg)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with quiet_transformer_lens():
        folded.load_and_process_state_dict(
            state,
            fold_ln=True,
            center_writing_weights=center_writing_weights and norm == "LN",
            center_unembed=center_unembed,
            fold_value_biases=fold_value_biases,
        )
    if positional_embedding_type(model) == "none":
        disable_positional_embedding(folded)
    folded.eval()
    return folded
