"""The circuit matrices read straight off the weights (Elhage et al. 2021), as TransformerLens FactoredMatrix
objects, so the unembedding's products live with the rest of the model's math."""

from __future__ import annotations

import torch

from toylens._compat import FactoredMatrix, HookedTransformer


def full_ov_circuit(model: HookedTransformer, tokens: torch.Tensor | None = None) -> FactoredMatrix:
    """``W_E W_V W_O W_U`` ``[layer, head_index, src_token, logit_token]``; ``tokens``: only those rows and
    columns (token ids)."""
    if tokens is None:
        return model.W_E @ model.OV @ model.W_U
    return model.W_E[tokens] @ model.OV @ model.W_U[:, tokens]
