"""The engine pieces the patching engine resumes with (``toylens.model.fused.Engine``), in the shapes its chunks
use: blocks on positions ``[p0, T)`` after the corrupted keys and values of earlier positions, one head's
attention, and the last block at each row's answer position only."""

from __future__ import annotations

from jaxtyping import Float, Int
from torch import Tensor

from toylens._compat import HookedTransformer
from toylens.model.fused import Engine


class FastBlocks:
    """Per-layer weights of ``model`` laid out once (the engine), for resumed, position-restricted forwards."""

    def __init__(self, model: HookedTransformer):
        self.eng = Engine(model)
        self.n_layers, self.n_heads, self.d_head = self.eng.n_layers, self.eng.n_heads, self.eng.d_head
        self.attn_only = self.eng.attn_only

    def rotate(self, layer: int, x: Tensor, positions: Tensor) -> Tensor:
        return self.eng.rotate(layer, x, positions)

    def attention(self, layer: int, q: Float[Tensor, "n qpos head_index d_head"],
                  k: Float[Tensor, "n kpos head_index d_head"], v: Float[Tensor, "n kpos head_index d_head"],
                  qpos: Int[Tensor, "n qpos"] | Int[Tensor, " qpos"], keep: dict | None = None,
                  ) -> Float[Tensor, "n qpos head_index d_head"]:
        """Attention of queries at absolute positions ``qpos`` over keys ``0..kpos-1`` (the pattern is put in
        ``keep["pattern"]`` when ``keep`` is given)."""
        return self.eng.attention(layer, q, k, v, qpos, keep)

    def head_attention(self, layer: int, q: Float[Tensor, "n qpos d_head"], k: Float[Tensor, "n kpos d_head"],
                       v: Float[Tensor, "n kpos d_head"], qpos: Int[Tensor, "n qpos"]) -> Tensor:
        """One head's attention (the patched head of a q or k patch)."""
        return self.eng.attention(layer, q[:, :, None], k[:, :, None], v[:, :, None], qpos)[:, :, 0]

    def attn_out(self, layer: int, z: Float[Tensor, "... head_index d_head"]) -> Float[Tensor, "... d_model"]:
        return self.eng.attn_out(layer, z)

    def after_attention(self, layer: int, resid_mid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """resid_post from resid_mid (the MLP half; identity for attention-only models)."""
        return self.eng.after_attention(layer, resid_mid)

    def qkv(self, layer: int, x: Float[Tensor, "n pos d_model"], positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k (rotated at ``positions``) and v of residual ``x``: ``[n, pos, head_index, d_head]`` each."""
        return self.eng.qkv(layer, self.eng.norm(x, self.eng.layers[layer].ln1), positions)

    def block(self, layer: int, x: Float[Tensor, "n pos d_model"], k_prefix: Tensor | None, v_prefix: Tensor | None,
              p0: int) -> Float[Tensor, "n pos d_model"]:
        """Block ``layer`` on positions ``[p0, p0 + pos)``, keys/values of earlier positions given."""
        return self.eng.block(layer, x, (k_prefix, v_prefix) if p0 else None, p0)

    def last_block(self, layer: int, x: Float[Tensor, "n pos d_model"], k_prefix: Tensor | None,
                   v_prefix: Tensor | None, p0: int, answer_pos: Int[Tensor, " n"]) -> Float[Tensor, "n d_model"]:
        """Block ``layer`` when only each row's ``answer_pos`` is read afterwards."""
        return self.eng.block_at_rows(layer, x, (k_prefix, v_prefix) if p0 else None, p0, answer_pos)

    def run_with_cache(self, tokens: Int[Tensor, "batch pos"], acts: set[str]) -> dict[str, list[Tensor]]:
        """The forward on ``tokens`` keeping ``acts`` of every layer (``Engine.cache``)."""
        return self.eng.cache(tokens, acts)
