"""Circuit discovery across training: every checkpoint's EAP score for each edge of the final circuit and the
final circuit's faithfulness (exact edge patching), so a user sees when each edge forms. Two forwards and one
backward per checkpoint, plus one masked forward."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from toylens.analyze.discovery import DiscoveryResult, methods
from toylens.analyze.discovery.edges import EdgeRunner
from toylens.analyze.pairs import PromptPairs
from toylens.result import Result

FORMED_AT = 0.5  # an edge "forms" at the first checkpoint where |score| reaches this share of its final |score|


@dataclasses.dataclass
class DiscoveryDynamics(Result):
    steps: list[int]
    edges: list[tuple[str, str]]  # the final circuit's edges
    scores: list[list[float]]  # [step][edge]: EAP score at that checkpoint
    faithfulness: list[float]  # [step]: the final circuit's metric recovered at that checkpoint
    formed_at: dict[str, int | None]  # "src -> dst": first step where |score| >= FORMED_AT x final |score|
    metric: str

    def figures(self) -> dict:
        fig = go.Figure()
        for j, (src, dst) in enumerate(self.edges):
            fig.add_trace(go.Scatter(x=self.steps, y=[row[j] for row in self.scores], mode="lines+markers",
                                     name=f"{src} → {dst}"))
        fig.update_layout(title="EAP score of each edge of the final circuit against the training step",
                          xaxis_title="step", yaxis_title=f"EAP score ({self.metric})")
        faith = go.Figure(go.Scatter(x=self.steps, y=self.faithfulness, mode="lines+markers"))
        faith.update_layout(title="The final circuit's faithfulness at each checkpoint (0 corrupted, 1 clean)",
                            xaxis_title="step", yaxis_title="recovered")
        return {"dynamics/discovery_edges": fig, "dynamics/discovery_faithfulness": faith}


def discovery_over_checkpoints(run, pairs: PromptPairs, final: DiscoveryResult, steps: Sequence[int] | None = None,
                               device: str = "cpu", progress: bool = False) -> DiscoveryDynamics:
    """``final``'s circuit followed through ``run``'s checkpoints (default: every saved one)."""
    steps = sorted(run.check_step(s) for s in (run.steps if steps is None else steps))
    circuit = final.circuit
    scores, faith = [], []
    for step in tqdm(steps, disable=not progress, desc="discovery over checkpoints"):
        runner = EdgeRunner(run.model(step, device=device), pairs, final.metric if final.metric != "custom" else
                            "logit_diff", final.settings.get("ablation", "corrupted"))
        g = runner.graph
        eap = methods.eap(runner)
        scores.append([float(eap[g.index(s, d)]) for s, d in circuit])
        mask = g.mask(circuit).to(runner.A.dtype)
        with torch.no_grad():
            faith.append(runner.recovered(runner.value(runner.forward(mask))))
    formed = {}
    for j, (s, d) in enumerate(circuit):
        last = abs(scores[-1][j])
        hit = next((st for st, row in zip(steps, scores, strict=True) if last > 0 and abs(row[j]) >= FORMED_AT * last),
                   None)
        formed[f"{s} -> {d}"] = hit
    return DiscoveryDynamics(steps=steps, edges=circuit, scores=scores, faithfulness=faith, formed_at=formed,
                             metric=final.metric)
