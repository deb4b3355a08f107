"""Small plotly helpers shared by the analyses' ``figures()``: heatmap, line, bar.

Each takes tensors or arrays and returns a ``plotly.graph_objects.Figure`` (never shows it), so
the report decides where figures go. Heatmaps put the first axis on y (rows: query, source token,
position) and the second on x, as ``px.imshow`` does in the notebooks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
import torch


def to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=float)


def token_labels(ids: Sequence[int], token_names: Sequence[str] | None) -> list[str]:
    """Axis labels for token ids: ``token_names[id]`` when given, else the id itself."""
    if token_names is None:
        return [str(int(i)) for i in ids]
    return [f"{token_names[int(i)]}" for i in ids]


def _unique(labels: Sequence[str] | None) -> list[str] | None:
    # Plotly merges repeated categorical labels into one cell: suffix repeats to keep every row.
    if labels is None:
        return None
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        n = seen.get(lab, 0)
        seen[lab] = n + 1
        out.append(lab if n == 0 else f"{lab} ({n})")
    return out


def heatmap(z, *, x_labels: Sequence[str] | None = None, y_labels: Sequence[str] | None = None,
            title: str = "", xaxis: str = "", yaxis: str = "", diverging: bool = True,
            zmin: float | None = None, zmax: float | None = None) -> go.Figure:
    """A heatmap of a 2-D tensor; ``diverging`` centres a red-blue scale on zero."""
    z = to_numpy(z)
    if z.ndim != 2:
        raise ValueError(f"heatmap needs a 2-D tensor, got shape {z.shape}")
    kwargs: dict = {"colorscale": "RdBu", "zmid": 0.0, "reversescale": True} if diverging else {
        "colorscale": "Viridis"}
    if zmin is not None or zmax is not None:
        kwargs.pop("zmid", None)
        kwargs.update(zmin=zmin, zmax=zmax)
    fig = go.Figure(go.Heatmap(z=z, x=_unique(x_labels), y=_unique(y_labels), **kwargs))
    fig.update_layout(title=title, xaxis_title=xaxis, yaxis_title=yaxis)
    fig.update_yaxes(autorange="reversed")  # row 0 at the top, as in a matrix
    if x_labels is not None:
        fig.update_xaxes(type="category")
    if y_labels is not None:
        fig.update_yaxes(type="category")
    return fig


def line(ys, *, labels: Sequence[str] | None = None, x=None, title: str = "", xaxis: str = "",
         yaxis: str = "") -> go.Figure:
    """One line per row of ``ys`` (a 1-D tensor is one line)."""
    ys = to_numpy(ys)
    if ys.ndim == 1:
        ys = ys[None]
    xs = to_numpy(x) if x is not None else np.arange(ys.shape[1])
    fig = go.Figure()
    for i, y in enumerate(ys):
        name = labels[i] if labels is not None else str(i)
        fig.add_trace(go.Scatter(x=xs, y=y, mode="lines", name=name))
    fig.update_layout(title=title, xaxis_title=xaxis, yaxis_title=yaxis)
    return fig


def bar(values, *, labels: Sequence[str] | None = None, title: str = "", xaxis: str = "",
        yaxis: str = "") -> go.Figure:
    """A bar per value, labelled (e.g. one bar per component or head)."""
    values = to_numpy(values).reshape(-1)
    names = list(labels) if labels is not None else [str(i) for i in range(len(values))]
    fig = go.Figure(go.Bar(x=names, y=values))
    fig.update_layout(title=title, xaxis_title=xaxis, yaxis_title=yaxis)
    fig.update_xaxes(type="category")
    return fig
