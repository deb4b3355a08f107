"""Developmental stages from a curve over checkpoints (Hoogland et al. 2024: stages read off the LLC curve's
plateaus and critical points). The curve is smoothed, its slope taken per step, and each checkpoint labelled
rising, falling or plateau (|slope| at most ``plateau`` = 0.5 x the mean |slope|); a boundary is where the
label changes: a slope-sign change (a critical point) or a plateau starting or ending. Runs shorter than ``min_len``
checkpoints are merged into the one before, so noise does not make a stage.

    stages = find_stages(steps, llc_mean)                    # [{"from_step", "to_step", "kind", "change"}, ...]
    describe(stages, steps, {"loss": loss, "L1H0 induction": s})  # what else changed within each stage
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PLATEAU = 0.5  # |slope| <= half the curve's mean |slope|: a plateau
WINDOW = 3  # smoothing: centred moving average over this many checkpoints
MIN_LEN = 2  # a run of one label shorter than this is noise, merged into its neighbour


def smooth(values: Sequence[float], window: int = WINDOW) -> np.ndarray:
    """Centred moving average; the window shrinks at the ends (no padding)."""
    v = np.asarray(values, dtype=float)
    half = window // 2
    return np.array([v[max(0, i - half):i + half + 1].mean() for i in range(len(v))])


def labels(steps: Sequence[int], values: Sequence[float], plateau: float = PLATEAU,
           window: int = WINDOW) -> list[str]:
    """``rising`` / ``falling`` / ``plateau`` per checkpoint, from the smoothed curve's slope per step."""
    s = smooth(values, window)
    if len(s) < 2:
        return ["plateau"] * len(s)
    slope = np.gradient(s, np.asarray(steps, dtype=float))
    # against the mean |slope|, not the largest: one steep transition (grokking's memorisation, where the LLC
    # rises ~10x faster than it later falls) must not turn every gentler change into a "plateau"
    top = float(np.abs(slope).mean())
    if top == 0:
        return ["plateau"] * len(s)
    return ["plateau" if abs(g) <= plateau * top else "rising" if g > 0 else "falling" for g in slope]


def find_stages(steps: Sequence[int], values: Sequence[float], plateau: float = PLATEAU, window: int = WINDOW,
                min_len: int = MIN_LEN) -> list[dict]:
    """Stages of ``values`` over ``steps``: each ``{"from_step", "to_step", "kind", "start", "end", "change"}``
    (``start``/``end``: the smoothed value there). Consecutive stages share their boundary checkpoint."""
    steps = list(steps)
    lab = labels(steps, values, plateau, window)
    if not lab:
        return []
    runs: list[list] = []  # [label, first index, last index]
    for i, x in enumerate(lab):
        if runs and runs[-1][0] == x:
            runs[-1][2] = i
        else:
            runs.append([x, i, i])
    changed = True
    while changed and len(runs) > 1:  # merge the shortest too-short run into a neighbour, repeat
        changed = False
        short = [k for k, r in enumerate(runs) if r[2] - r[1] + 1 < min_len]
        if short:
            k = short[0]
            j = k - 1 if k > 0 else k + 1
            lo, hi = min(runs[j][1], runs[k][1]), max(runs[j][2], runs[k][2])
            runs[j] = [runs[j][0], lo, hi]
            del runs[k]
            merged: list[list] = []
            for r in runs:  # neighbours that now share a label become one run
                if merged and merged[-1][0] == r[0]:
                    merged[-1][2] = r[2]
                else:
                    merged.append(r)
            runs, changed = merged, True
    s = smooth(values, window)
    out = []
    for k, (kind, a, b) in enumerate(runs):
        # stages share their boundary checkpoint: the last of a run (a peak or trough belongs to both sides)
        a = runs[k - 1][2] if k else a
        out.append({"from_step": steps[a], "to_step": steps[b], "kind": kind, "start": float(s[a]),
                    "end": float(s[b]), "change": float(s[b] - s[a])})
    return out


def boundaries(stages: list[dict]) -> list[int]:
    """The steps where one stage ends and the next begins."""
    return [st["from_step"] for st in stages[1:]]


def describe(stages: list[dict], steps: Sequence[int], signals: dict[str, Sequence[float]], top: int = 3) -> list[dict]:
    """Each stage with ``changed``: the ``top`` signals whose value moved most within it (relative to that signal's
    range over all checkpoints), as ``{"name", "from", "to"}``; and a one-line ``text``."""
    steps = list(steps)
    out = []
    for st in stages:
        a, b = steps.index(st["from_step"]), steps.index(st["to_step"])
        moved = []
        for name, v in signals.items():
            v = np.asarray(v, dtype=float)
            span = float(np.nanmax(v) - np.nanmin(v)) if np.isfinite(v).any() else 0.0
            if span > 0 and np.isfinite(v[a]) and np.isfinite(v[b]):
                moved.append((abs(v[b] - v[a]) / span, name, float(v[a]), float(v[b])))
        moved.sort(reverse=True)
        changed = [{"name": n, "from": f, "to": t} for r, n, f, t in moved[:top] if r >= 0.1]
        text = (f"steps {st['from_step']}–{st['to_step']}: LLC {st['kind']} ({st['start']:.3g} → {st['end']:.3g})"
                + ("; " + ", ".join(f"{c['name']} {c['from']:.3g} → {c['to']:.3g}" for c in changed) if changed
                   else "; nothing else moved by 10% of its range"))
        out.append({**st, "changed": changed, "text": text})
    return out


MIN_RISE = 0.2  # a head "forms" a score (previous-token, induction: in [0, 1]) when it rises at least this much


def formation_steps(steps: Sequence[int], series: dict[str, Sequence[float]], fraction: float = 0.5,
                    min_rise: float = MIN_RISE) -> dict[str, int]:
    """For each named curve that rises by at least ``min_rise`` from its first value to its maximum: the first step
    at which it has made ``fraction`` of that rise (as ``DynamicsResult.formed_at``, for every head, not only the
    one that rises most). Curves that do not rise so far are left out."""
    steps = list(steps)
    out: dict[str, int] = {}
    for name, v in series.items():
        v = np.nan_to_num(np.asarray(v, dtype=float), nan=-np.inf)
        if len(v) == 0 or not np.isfinite(v[0]):
            continue
        top = float(v.max())
        rise = top - float(v[0])
        if rise >= min_rise:
            target = float(v[0]) + fraction * rise
            out[name] = steps[int(np.argmax(v >= target))]
    return out


def in_stage(step: int, stage: dict, first: bool) -> bool:
    """Whether an event at ``step`` falls in ``stage`` (stages share boundaries: an event on a boundary belongs to
    the stage that ends there; the first stage also holds its own first step)."""
    return (stage["from_step"] < step or (first and step == stage["from_step"])) and step <= stage["to_step"]


def stage_events(stages: list[dict], events: dict[str, dict[str, int | None]]) -> list[dict]:
    """Each stage with the events that happened in it: ``events`` maps a kind ("heads_formed", "edges_formed") to
    ``{what: step}`` (None: never); a stage gets ``{kind: [{"name", "step"}, ...]}`` sorted by step."""
    out = []
    for k, st in enumerate(stages):
        row = dict(st)
        for kind, by_name in events.items():
            hits = [{"name": n, "step": s} for n, s in by_name.items() if s is not None and in_stage(s, st, k == 0)]
            row[kind] = sorted(hits, key=lambda h: (h["step"], h["name"]))
        out.append(row)
    return out


def overlapping(stage: dict, spans: dict[str, Sequence[int] | None]) -> list[str]:
    """The names of ``spans`` (e.g. grokking's phases ``{name: [from_step, to_step]}``) that overlap ``stage``."""
    return [n for n, span in spans.items() if span and span[0] < stage["to_step"] and span[1] > stage["from_step"]]
