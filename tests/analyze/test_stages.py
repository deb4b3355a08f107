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
