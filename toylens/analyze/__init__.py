"""Take trained models apart: one module per analysis, their public names imported on first use (TransformerLens
takes seconds to import), e.g. ``toylens.analyze.ablate_every_hook(run.model(), run.batch(1000))``."""

from __future__ import annotations

import importlib

_LAZY = {
    "load_run": "toylens.runs.run",
    "Run": "toylens.runs.run",
    "RunError": "toylens.runs.run",
    "fold": "toylens.model.fold",
    "circuits": "toylens.analyze.qkov",
    "attention_patterns": "toylens.analyze.attention",
    "direct_logit_attribution": "toylens.analyze.attribution",
    "logit_lens": "toylens.analyze.attribution",
    "neuron_activity": "toylens.analyze.neurons",
    "ablate_every_hook": "toylens.analyze.ablation",
    "checkpoint_dynamics": "toylens.analyze.dynamics",
    "induction_circuit": "toylens.analyze.induction",
    "repeat_spec": "toylens.analyze.induction",
    "fourier_analysis": "toylens.analyze.fourier",
    "induction_dynamics": "toylens.analyze.canon_dynamics",
    "grokking_dynamics": "toylens.analyze.canon_dynamics",
    "test_prompt": "toylens.analyze.prompts",
    "attach_tokenizer": "toylens.runs.tokenizer",
    "pairs_from_task": "toylens.analyze.prompts",
    "pairs_from_prompts": "toylens.analyze.prompts",
    "PromptPairs": "toylens.analyze.pairs",
    "load_pretrained": "toylens.analyze.pretrained",
    "hf_equivalence": "toylens.analyze.pretrained",
    "patch": "toylens.analyze.patching",
    "patching_context": "toylens.analyze.patching",
    "attribution_patch": "toylens.analyze.attribution_patching",
    "causal_trace": "toylens.analyze.tracing",
    "llc": "toylens.analyze.learning_coefficient",
    "llc_over_checkpoints": "toylens.analyze.learning_coefficient",
    "LLCConfig": "toylens.analyze.learning_coefficient",
    "find_stages": "toylens.analyze.stages",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
