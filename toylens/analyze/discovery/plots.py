"""Figures of a discovery result: the circuit as a layered graph (nodes by layer, edge width by score) and the
faithfulness curve."""

from __future__ import annotations

import plotly.graph_objects as go


def _position(node: str) -> tuple[float, float]:
    """(x, y) of a node: y by layer (embed at the bottom, logits on top), x by head; inputs of a head (.q/.k/.v)
    sit just below it."""
    base = node.split(".")[0]
    if base == "embed":
        return 0.0, 0.0
    if base == "logits":
        return 0.0, 1000.0
    if base.startswith("MLP"):
        return 0.0, 2 * int(base[3:]) + 1.6
    layer, head = base[1:].split("H")
    offset = {"q": -0.25, "k": 0.0, "v": 0.25}.get(node.split(".")[1], 0.0) if "." in node else 0.0
    return 1.0 + int(head) + offset, 2 * int(layer) + 1.0 - (0.4 if "." in node else 0.0)


def circuit_figure(result) -> go.Figure:
    circuit = [e for e in result.edges if e["in_circuit"]]
    nodes = sorted({e["src"] for e in circuit} | {e["dst"] for e in circuit}, key=lambda n: _position(n)[::-1])
    top = max([_position(n)[1] for n in nodes if n != "logits"] + [1.0]) + 1.5
    pos = {n: (_position(n)[0], top if n == "logits" else _position(n)[1]) for n in nodes}
    biggest = max([abs(e["score"]) for e in circuit] + [1e-12])
    fig = go.Figure()
    for e in circuit:
        (x0, y0), (x1, y1) = pos[e["src"]], pos[e["dst"]]
        fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", hoverinfo="text",
                                 text=f"{e['src']} → {e['dst']}: {e['score']:.4g}", showlegend=False,
                                 line=dict(width=1 + 7 * abs(e["score"]) / biggest,
                                           color="#c0392b" if e["score"] < 0 else "#2c7fb8")))
    fig.add_trace(go.Scatter(x=[pos[n][0] for n in nodes], y=[pos[n][1] for n in nodes], mode="markers+text",
                             text=nodes, textposition="top center", marker=dict(size=10, color="#333"),
                             hoverinfo="text", showlegend=False))
    fig.update_layout(title=f"Circuit ({result.method}, {len(circuit)} edges; width: |score|)",
                      xaxis=dict(visible=False), yaxis=dict(visible=False), height=480)
    return fig


def faithfulness_figure(result) -> go.Figure:
    f = result.faithfulness
    fig = go.Figure(go.Scatter(x=f["n_edges"], y=f["recovered"], mode="lines+markers", name="top-k edges"))
    n_circuit = sum(e["in_circuit"] for e in result.edges)
    fig.add_trace(go.Scatter(x=[n_circuit], y=[f["circuit_recovered"]], mode="markers", name="chosen circuit",
                             marker=dict(size=12, symbol="star")))
    fig.update_layout(title=f"Faithfulness: {result.metric} recovered against edges kept ({result.method})",
                      xaxis_title="edges kept (best first)", yaxis_title="recovered (0 corrupted, 1 clean)",
                      height=380)
    return fig
