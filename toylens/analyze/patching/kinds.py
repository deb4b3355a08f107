"""The sweep kinds of ``toylens.analyze.patching``: what each patches and the axes it iterates over,
in ``transformer_lens.patching``'s order, plus TransformerLens's hook names."""

from __future__ import annotations

import dataclasses

from toylens._compat import HookedTransformer


class PatchingError(ValueError):
    """A sweep that cannot run as asked; the message names the argument and the fix."""


@dataclasses.dataclass(frozen=True)
class Kind:
    """One sweep: the patched activation and the axes iterated over (TransformerLens's order)."""

    name: str
    act: str  # resid_pre, resid_mid, resid_post, attn_out, mlp_out, z, q, k, v, pattern
    axes: tuple[str, ...]  # e.g. ("layer", "pos", "head_index")
    tl_function: str  # its function in transformer_lens.patching ("" when TL has none)

    @property
    def all_pos(self) -> bool:
        return "pos" not in self.axes and "dest_pos" not in self.axes

    @property
    def local(self) -> bool:
        """Inside its layer, the patch changes the residual stream at the patched position only."""
        if self.act in ("resid_mid", "resid_post", "attn_out", "mlp_out"):
            return True
        return not self.all_pos and self.act in ("z", "q", "pattern")


_LP, _LH, _LPH = ("layer", "pos"), ("layer", "head_index"), ("layer", "pos", "head_index")
KINDS: dict[str, Kind] = {k.name: k for k in [
    Kind("resid_pre", "resid_pre", _LP, "get_act_patch_resid_pre"),
    Kind("resid_mid", "resid_mid", _LP, "get_act_patch_resid_mid"),
    Kind("resid_post", "resid_post", _LP, ""),
    Kind("attn_out", "attn_out", _LP, "get_act_patch_attn_out"),
    Kind("mlp_out", "mlp_out", _LP, "get_act_patch_mlp_out"),
    Kind("z_all_pos", "z", _LH, "get_act_patch_attn_head_out_all_pos"),
    Kind("q_all_pos", "q", _LH, "get_act_patch_attn_head_q_all_pos"),
    Kind("k_all_pos", "k", _LH, "get_act_patch_attn_head_k_all_pos"),
    Kind("v_all_pos", "v", _LH, "get_act_patch_attn_head_v_all_pos"),
    Kind("pattern_all_pos", "pattern", _LH, "get_act_patch_attn_head_pattern_all_pos"),
    Kind("z_by_pos", "z", _LPH, "get_act_patch_attn_head_out_by_pos"),
    Kind("q_by_pos", "q", _LPH, "get_act_patch_attn_head_q_by_pos"),
    Kind("k_by_pos", "k", _LPH, "get_act_patch_attn_head_k_by_pos"),
    Kind("v_by_pos", "v", _LPH, "get_act_patch_attn_head_v_by_pos"),
    Kind("pattern_by_pos", "pattern", ("layer", "head_index", "dest_pos"), "get_act_patch_attn_head_pattern_by_pos"),
    Kind("pattern_dest_src", "pattern", ("layer", "head_index", "dest_pos", "src_pos"),
         "get_act_patch_attn_head_pattern_dest_src_pos"),
]}
_BLOCK_HOOKS = {"resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "resid_post": "hook_resid_post",
                "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out", "z": "attn.hook_z", "q": "attn.hook_q",
                "k": "attn.hook_k", "v": "attn.hook_v", "pattern": "attn.hook_pattern",
                "rot_q": "attn.hook_rot_q", "rot_k": "attn.hook_rot_k"}
_TOKEN_LOCAL = ("resid_pre", "q", "k", "v")  # at layer 0 a function of the token at the position alone


def hook_name(act: str, layer: int) -> str:
    return f"blocks.{layer}.{_BLOCK_HOOKS[act]}"


def n_heads_for(model: HookedTransformer, act: str) -> int:
    """Heads on the head axis (TransformerLens: key/value heads for k and v under grouped-query attention)."""
    c = model.cfg
    return c.n_key_value_heads if act in ("k", "v") and c.n_key_value_heads is not None else c.n_heads
