"""Imports of TransformerLens with its 3.x deprecation warning silenced for toylens only.

TransformerLens 3.9 warns that HookedTransformer will be removed in 4.0; toylens pins <4 on
purpose, so the warning is noise for our users. We filter it here, scoped to that one message,
rather than globally: other deprecation warnings still reach the user.
"""

import warnings

warnings.filterwarnings("ignore", message=r".*HookedTransformer is deprecated.*", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=r".*is deprecated and will be removed in 4\.0.*", category=DeprecationWarning)

from transformer_lens import (  # noqa: E402
    ActivationCache,
    FactoredMatrix,
    HookedTransformer,
    HookedTransformerConfig,
)

__all__ = ["ActivationCache", "FactoredMatrix", "HookedTransformer", "HookedTransformerConfig"]
