"""The shape every analysis returns: a dataclass with ``to_dict()`` (JSON-safe numbers for
report.json) and ``figures()`` (named plotly figures for the HTML report)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch


def jsonable(v: Any) -> Any:
    """Tensors and arrays to nested lists, NaN/inf to None, dataclasses to dicts: JSON-safe."""
    if isinstance(v, Result):
        return v.to_dict()
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        v = v.float().numpy() if v.is_floating_point() else v.numpy()
    if isinstance(v, complex):
        return {"real": jsonable(v.real), "imag": jsonable(v.imag)}
    if isinstance(v, np.ndarray):
        return jsonable(v.tolist())
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: jsonable(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


class Result:
    """Mixin for analysis results (dataclasses). Override ``figures``; ``to_dict`` is generic."""

    def to_dict(self) -> dict:
        return {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def figures(self) -> dict:
        """Named plotly figures, e.g. ``{"attention/L0H0": fig}``."""
        return {}
