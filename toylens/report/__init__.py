"""The report of a run or a pretrained model: analyze config, page model, section builders, html, wandb, CLI.

    from toylens.report import AnalyzeConfig, make_report
    make_report(toylens.load_run(path), AnalyzeConfig(run=str(path), analyses=["attention", "ablation"]))
"""

from __future__ import annotations

import importlib

_LAZY = {"AnalyzeConfig": "toylens.report.config", "validate": "toylens.report.config",
         "build_report": "toylens.report.build", "make_report": "toylens.report.build",
         "AnalysisOutput": "toylens.report.registry", "SectionSpec": "toylens.report.registry"}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
