"""Stages from a curve: boundaries found on a synthetic curve with planted breakpoints."""

from __future__ import annotations

import numpy as np

from toylens.analyze.stages import boundaries, describe, find_stages, smooth


def planted(noise=0.0, seed=0):
    """Rise over checkpoints 0-10, plateau 10-20, fall 20-30, rise 30-40 (steps 15 apart)."""
    steps = [15 * i for i in range(41)]
    v = []
    for i in range(41):
        v.append(i if i <= 10 else 10 if i <= 20 else 10 - 0.6 * (i - 20) if i <= 30 else 4 + 0.8 * (i - 30))
    rng = np.random.default_rng(seed)
    return steps, list(np.asarray(v) + noise * rng.standard_normal(41))


def test_planted_breakpoints_found_within_one_checkpoint():
    for noise in (0.0, 0.1):
        steps, v = planted(noise)
        st = find_stages(steps, v)
        assert [s["kind"] for s in st] == ["rising", "plateau", "falling", "rising"], (noise, st)
        for got, want in zip(boundaries(st), (10, 20, 30), strict=True):
            assert abs(got - 15 * want) <= 15, (noise, boundaries(st))
        assert st[0]["from_step"] == 0 and st[-1]["to_step"] == steps[-1]
        assert all(a["to_step"] == b["from_step"] for a, b in zip(st, st[1:], strict=False))


def test_describe_names_what_changed():
    steps, v = planted()
    st = find_stages(steps, v)
    loss = [4.0 if i < 10 else 0.5 for i in range(41)]  # drops within the first stage
    d = describe(st, steps, {"loss": loss, "flat": [1.0] * 41})
    assert d[0]["changed"][0]["name"] == "loss" and "loss 4 → 0.5" in d[0]["text"]
    assert d[1]["changed"] == [] and "nothing else moved" in d[1]["text"]


def test_flat_and_short_curves():
    assert [s["kind"] for s in find_stages([0, 1, 2], [1.0, 1.0, 1.0])] == ["plateau"]
    assert find_stages([], []) == []
    assert np.allclose(smooth([0.0, 3.0, 6.0]), [1.5, 3.0, 4.5])


def test_formation_steps_every_head_that_rises():
    from toylens.analyze.stages import formation_steps

    steps = [0, 10, 20, 30, 40]
    got = formation_steps(steps, {"a": [0.0, 0.1, 0.5, 0.9, 0.9],  # rise 0.9: half (0.45) first reached at 20
                                  "b": [0.1, 0.1, 0.15, 0.2, 0.25],  # rises 0.15 < 0.2: never formed
                                  "c": [0.2, 0.8, 0.8, 0.7, 0.6],  # rise 0.6, half at 10
                                  "d": [float("nan")] * 5})
    assert got == {"a": 20, "c": 10}


def test_stage_events_and_overlaps():
    from toylens.analyze.stages import overlapping, stage_events

    stages = [{"from_step": 0, "to_step": 100}, {"from_step": 100, "to_step": 200}]
    ev = stage_events(stages, {"edges_formed": {"x": 0, "y": 100, "z": 150, "never": None},
                               "heads_formed": {"h": 200}})
    assert [e["name"] for e in ev[0]["edges_formed"]] == ["x", "y"]  # a boundary event belongs to the stage it ends
    assert [e["name"] for e in ev[1]["edges_formed"]] == ["z"] and ev[1]["heads_formed"] == [{"name": "h",
                                                                                             "step": 200}]
    assert ev[0]["heads_formed"] == [] and "never" not in str(ev)
    spans = {"memorisation": [0, 50], "circuit_formation": [50, 150], "cleanup": [150, 175], "none": None}
    assert overlapping(stages[0], spans) == ["memorisation", "circuit_formation"]
    assert overlapping(stages[1], spans) == ["circuit_formation", "cleanup"]


def test_a_steep_rise_does_not_hide_a_long_gentle_fall():
    # grokking's LLC shape: up 300 in 4 checkpoints, down 280 over 20, then flat for 20; the fall is 5x gentler
    # than the rise, and still a stage of its own
    steps = [25 * i for i in range(45)]
    v = [75.0 * i if i <= 4 else 300 - 14.0 * (i - 4) if i <= 24 else 20.0 for i in range(45)]
    st = find_stages(steps, v)
    assert [s["kind"] for s in st] == ["rising", "falling", "plateau"], st
    assert abs(boundaries(st)[0] - 100) <= 25 and abs(boundaries(st)[1] - 600) <= 25
