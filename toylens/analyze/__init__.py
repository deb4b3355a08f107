"""Take trained models apart: load a run, fold, circuits, attention, attribution, neurons, ablation.

    import toylens
    run = toylens.load_run(path)
    model = run.model(folded=True)
    toylens.analyze.attention_patterns(model, run.batch(1000))
    toylens.analyze.ablate_every_hook(run.model(), run.batch(1000), reference=run.batch(1000, seed=1))

Names are imported on first use (TransformerLens takes seconds to import), so ``import
toylens.analyze`` and the ``toylens-analyze`` CLI's input checks stay fast.

``fold`` and ``circuits`` are both a submodule and that submodule's main function. Here they are
the submodules, made callable: ``toylens.analyze.fold(model, batch)`` calls
``toylens.analyze.fold.fold(model, batch)``, while ``import toylens.analyze.fold as m`` and
``m.fold_layer_norm`` keep working as for any module.
"""

from __future__ import annotations

import importlib
import sys
import types

_LAZY = {
    "load_run": "toylens.analyze.run",
    "Run": "toylens.analyze.run",
    "RunError": "toylens.analyze.run",
    "attention_patterns": "toylens.analyze.attention",
    "direct_logit_attribution": "toylens.analyze.attribution",
    "logit_lens": "toylens.analyze.attribution",
    "neuron_activity": "toylens.analyze.neurons",
    "ablate_every_hook": "toylens.analyze.ablation",
}
_CALLABLE_SUBMODULES = ("fold", "circuits")

__all__ = ["Run", "RunError", "load_run", "fold", "circuits", "attention_patterns", "direct_logit_attribution",
           "logit_lens", "neuron_activity", "ablate_every_hook"]


class _CallableModule(types.ModuleType):
    """A submodule that, called, calls its function of the same name (``fold.fold``, ``circuits.circuits``)."""

    def __call__(self, *args, **kwargs):
        return getattr(self, self.__name__.rsplit(".", 1)[1])(*args, **kwargs)


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # The import system binds each submodule here when it is first imported, however it is
        # imported; that is the one moment to make ``fold``/``circuits`` callable.
        if name in _CALLABLE_SUBMODULES and type(value) is types.ModuleType:
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _CALLABLE_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")  # bound (and made callable) by the import
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
