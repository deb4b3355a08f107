"""The TransformerLens names toylens uses, imported in one place.

TransformerLens 3.9 warns on every HookedTransformer construction that it will be removed in 4.0;
toylens pins <4 on purpose, so ``toylens.model.build.quiet_transformer_lens`` silences that one
warning around our own constructions only (the user's own calls still warn).
"""

from transformer_lens import (
    ActivationCache,
    FactoredMatrix,
    HookedTransformer,
    HookedTransformerConfig,
)

__all__ = ["ActivationCache", "FactoredMatrix", "HookedTransformer", "HookedTransformerConfig"]
