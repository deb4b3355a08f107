"""benchmarks/gpu_check.sh and gpu_bench.py on this CPU machine: the dry run checks that every command exists, the
CUDA-only tests collect, and every measurement runs (tiny sizes); without CUDA the real run refuses in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_the_dry_run_passes_every_stage_and_measurement(tmp_path):
    out = tmp_path / "dry.json"
    p = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "GPU_CHECK_JSON": str(out)})
    assert p.returncode == 0, p.stderr[-2000:]
    for n in (1, 2, 3, 4):
        assert f"=== stage {n}:" in p.stdout
    assert "dry run: 8 CUDA-only tests collected" in p.stdout
    rows = [ln for ln in p.stdout.splitlines() if ln.startswith(("seed (2 layers", "4 layers, d_model 256"))]
    assert len(rows) == 8 and sum("toylens" in r for r in rows) == sum("HT eager" in r for r in rows) == 4
    assert "grokking to held-out accuracy 0.99" in p.stdout and "patching/z_all_pos" in p.stdout
    assert p.stdout.rstrip().endswith("gpu_check: dry run passed")
    # the numbers it would report, each measured
    data = json.loads(out.read_text())
    assert data["dry_run"] and len(data["train"]) == 8
    assert all(v["ms_per_step"] > 0 and v["tokens_per_s"] > 0 for v in data["train"].values())
    assert set(data["interventions"]) == {"ablation", "patching/resid_pre", "patching/z_all_pos"}
    assert all(v["ratio"] > 0 for v in data["interventions"].values())
    assert data["grokking"]["step"] == 3 and data["grokking"]["capped"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_the_real_run_is_one_line_and_exit_2(tmp_path):
    p = subprocess.run([sys.executable, "benchmarks/gpu_bench.py", "--json", str(tmp_path / "x.json")], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "gpu_bench: error: CUDA is not available here; run it on a GPU machine, or --dry-run on a CPU"]
    assert not (tmp_path / "x.json").exists()
