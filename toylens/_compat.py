"""The TransformerLens names toylens uses, imported in one place.

TransformerLens 3.9 warns on every HookedTransformer construction that it will be removed in 4.0;
toylens pins <4 on purpose, so ``toylens.model.build.quiet_transformer_lens`` silences that one
warning around our own constructions only (the user's own calls still warn).
"""

import logging

# transformer_lens imports datasets, whose config logs "JAX version ... available." at INFO on import when jax
# is installed (the tracr extra); under Hydra's logging that line reached stdout, where the CLIs print only
# paths. WARNING is datasets' own default level, set here before its first import unless the user set one.
if logging.getLogger("datasets").level == logging.NOTSET:
    logging.getLogger("datasets").setLevel(logging.WARNING)

from transformer_lens import (  # noqa: E402
    ActivationCache,
    FactoredMatrix,
    HookedTransformer,
    HookedTransformerConfig,
)

__all__ = ["ActivationCache", "FactoredMatrix", "HookedTransformer", "HookedTransformerConfig"]
