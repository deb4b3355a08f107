"""tracr programs as HookedTransformers: compile a RASP program keeping tracr's craft model (which block reads and
writes which residual directions), convert the assembled weights, and encode inputs / decode outputs. Needs the
optional extra: ``pip install 'toylens[tracr]'``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from toylens._compat import HookedTransformer, HookedTransformerConfig
from toylens.model.build import make_model, quiet_transformer_lens

INSTALL = "tracr is not installed: pip install 'toylens[tracr]' (tracr-pypi, jax, dm-haiku)"


def _require_tracr() -> None:
    try:
        import haiku  # noqa: F401
        import jax  # noqa: F401
        import tracr  # noqa: F401
    except ImportError:
        raise ImportError(INSTALL) from None
    import sys

    from absl import logging as absl_logging

    # absl's handler keeps the sys.stderr of the moment absl was imported; where that was a temporary stream (a
    # test's captured output, a notebook's cell) later flushes (e.g. Hydra configuring logging) hit a closed
    # file. The process's own stderr stays open.
    if sys.__stderr__ is not None:
        absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__


@dataclasses.dataclass
class TracrProgram:
    """A compiled RASP program: tracr's assembled model, its craft model (``blocks``) and where each block sits in
    the transformer (``sites[i] = (layer, "attn" | "mlp")``), plus the encoders' settings."""

    assembled: Any  # tracr.compiler.assemble.AssembledTransformerModel
    craft: Any  # tracr.craft.transformers.SeriesWithResiduals
    sites: list[tuple[int, str]]
    vocab: frozenset
    max_seq_len: int
    bos: str
    pad: str

    @property
    def categorical(self) -> bool:
        return hasattr(self.assembled.output_encoder, "encoding_map")

    @property
    def output_values(self) -> list:
        """The output classes in unembedding order (categorical programs)."""
        enc = self.assembled.output_encoder.encoding_map
        return sorted(enc, key=enc.get)

    def model(self, dtype: torch.dtype = torch.float32) -> HookedTransformer:
        return from_tracr(self.assembled, dtype)

    def encode(self, inputs: Sequence[Sequence[Any]]) -> Tensor:
        """Token ids ``[batch, max_seq_len + 1]``: BOS, the input, then PAD (which tracr's selectors ignore)."""
        n = self.max_seq_len + 1
        rows = []
        for x in inputs:
            if len(x) > self.max_seq_len:
                raise ValueError(f"input {list(x)} is longer than max_seq_len={self.max_seq_len}")
            rows.append(self.assembled.input_encoder.encode([self.bos, *x] + [self.pad] * (n - 1 - len(x))))
        return torch.tensor(rows, dtype=torch.long)

    def output_id(self, value: Any) -> int:
        return self.assembled.output_encoder.encoding_map[value]

    def decode(self, logits: Tensor) -> list[list]:
        """Decoded outputs from logits ``[batch, pos, d_vocab_out]``, position 0 shown as BOS (as tracr does)."""
        if not self.categorical:
            return [[self.bos, *row[1:]] for row in logits[..., 0].tolist()]
        values = self.output_values
        return [[self.bos, *(values[i] for i in row[1:])] for row in logits.argmax(-1).tolist()]


def compile_program(program: Any, vocab: set, max_seq_len: int, *, causal: bool = False, bos: str = "BOS",
                    pad: str = "PAD", mlp_exactness: int = 100) -> TracrProgram:
    """``tracr.compiler.compiling.compile_rasp_to_model``'s steps, one by one, keeping the craft model it discards."""
    _require_tracr()
    from tracr.compiler import (
        assemble,
        basis_inference,
        craft_graph_to_model,
        craft_model_to_transformer,
        expr_to_craft_graph,
        rasp_to_graph,
        validating,
    )
    from tracr.craft import bases
    from tracr.rasp import rasp

    for name, token in (("bos", bos), ("pad", pad)):
        if token in vocab:
            raise ValueError(f"{name}={token!r} is in the vocabulary; choose another {name} token")
    unsupported = validating.static_validate(program)
    if unsupported:
        raise NotImplementedError("tracr cannot compile: " + "; ".join(f"{u.expr.name}: {u.reason}"
                                                                       for u in unsupported))
    extracted = rasp_to_graph.extract_rasp_graph(program)
    graph, sources, sink = extracted.graph, extracted.sources, extracted.sink
    basis_inference.infer_bases(graph, sink, vocab, max_seq_len)
    expr_to_craft_graph.add_craft_components_to_rasp_graph(
        graph, bos_dir=bases.BasisDirection(rasp.tokens.label, bos), mlp_exactness=mlp_exactness)
    craft = craft_graph_to_model.craft_graph_to_model(graph, sources)
    assembled = craft_model_to_transformer.craft_model_to_transformer(
        craft_model=craft, graph=graph, sink=sink, max_seq_len=max_seq_len, causal=causal, compiler_bos=bos,
        compiler_pad=pad)
    # the block -> "transformer/layer_{l}/{attn,mlp}" placement assemble used (a private helper: the same code path)
    _, names = assemble._get_model_config_and_module_names(craft)
    sites = [(int(n.split("/")[1].removeprefix("layer_")), n.rsplit("/", 1)[1]) for n in names]
    return TracrProgram(assembled, craft, sites, frozenset(vocab), max_seq_len, bos, pad)


def _unembed_matrix(assembled: Any) -> np.ndarray:
    """tracr's own unembedding ``[d_model, d_out]``: its unembed module applied to the identity (no argmax)."""
    import haiku as hk
    import jax.numpy as jnp

    d_model = len(assembled.residual_labels)

    @hk.without_apply_rng
    @hk.transform
    def unembed(x):
        return assembled.get_compiled_model().unembed(x, use_unembed_argmax=False)

    w = np.asarray(unembed.apply({}, jnp.eye(d_model)))
    return w.reshape(d_model, -1)  # a numerical output (one column) comes back squeezed


def from_tracr(assembled: Any, dtype: torch.dtype = torch.float32) -> HookedTransformer:
    """A HookedTransformer computing ``assembled``'s residual stream and its unembedding (the scores tracr takes the
    argmax of). Bidirectional unless compiled causal, no LayerNorm, ReLU MLPs, tracr's scale 1/sqrt(key_size)."""
    _require_tracr()
    mc = assembled.model_config
    if mc.layer_norm:
        raise ValueError("a tracr model with layer_norm=True; toylens converts tracr's own (layer_norm=False) models")
    p = {k: {n: np.asarray(v, dtype=np.float64) for n, v in d.items()} for k, d in assembled.params.items()}
    W_E, W_pos = p["token_embed"]["embeddings"], p["pos_embed"]["embeddings"]
    W_U = _unembed_matrix(assembled)
    H, dh, L = mc.num_heads, mc.key_size, mc.num_layers
    cfg = HookedTransformerConfig(
        n_layers=L, d_model=W_E.shape[1], n_heads=H, d_head=dh, d_mlp=mc.mlp_hidden_size, d_vocab=W_E.shape[0],
        d_vocab_out=W_U.shape[1], n_ctx=W_pos.shape[0], act_fn="relu", normalization_type=None,
        attention_dir="causal" if mc.causal else "bidirectional", positional_embedding_type="standard",
        dtype=dtype, default_prepend_bos=False, seed=None)
    state = {"embed.W_E": W_E, "pos_embed.W_pos": W_pos, "unembed.W_U": W_U, "unembed.b_U": np.zeros(W_U.shape[1])}
    for layer in range(L):
        a, m = f"transformer/layer_{layer}/attn", f"transformer/layer_{layer}/mlp"
        b = f"blocks.{layer}"
        for part, name in (("Q", "query"), ("K", "key"), ("V", "value")):
            w = p[f"{a}/{name}"]["w"]  # [d_model, H * d_head], heads outermost
            state[f"{b}.attn.W_{part}"] = w.reshape(w.shape[0], H, dh).transpose(1, 0, 2)
            state[f"{b}.attn.b_{part}"] = p[f"{a}/{name}"]["b"].reshape(H, dh)
        state[f"{b}.attn.W_O"] = p[f"{a}/linear"]["w"].reshape(H, dh, -1)
        state[f"{b}.attn.b_O"] = p[f"{a}/linear"]["b"]
        state[f"{b}.mlp.W_in"], state[f"{b}.mlp.b_in"] = p[f"{m}/linear_1"]["w"], p[f"{m}/linear_1"]["b"]
        state[f"{b}.mlp.W_out"], state[f"{b}.mlp.b_out"] = p[f"{m}/linear_2"]["w"], p[f"{m}/linear_2"]["b"]
    model = make_model(cfg, init_weights=False)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state and not k.endswith(("IGNORE", ".mask")))
    if missing:
        raise RuntimeError(f"tracr conversion left HookedTransformer weights unset: {missing}")
    with quiet_transformer_lens():
        model.load_state_dict({k: torch.tensor(v, dtype=dtype) for k, v in state.items()}, strict=False)
    return model.eval()
