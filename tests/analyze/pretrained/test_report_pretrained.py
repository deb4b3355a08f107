"""toylens-analyze model=pretrained: the intervention report of a (tiny, local) GPT-2 on prompt pairs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from toylens.report.config import AnalyzeConfig
from toylens.report.pretrained import make_pretrained_report

CLEAN = ["When Mary and John went to store John gave", "When John and Mary went to store Mary gave"]
CORRUPTED = ["When Mary and John went to store Mary gave", "When John and Mary went to store John gave"]


def config(out, path) -> AnalyzeConfig:
    cfg = AnalyzeConfig(device="cpu", progress=False, out=str(out), analyses=["patching", "tracing"])
    cfg.model.source, cfg.model.name, cfg.model.path = "pretrained", "gpt2", str(path)
    cfg.pairs.clean, cfg.pairs.corrupted = list(CLEAN), list(CORRUPTED)
    cfg.pairs.answers, cfg.pairs.wrong_answers = [" Mary", " John"], [" John", " Mary"]
    cfg.patching.kinds = ["resid_pre", "z_all_pos"]
    cfg.tracing.n_samples = 2
    return cfg


def test_pretrained_report_numbers_equal_direct_calls(tiny_gpt2, tiny_gpt2_dir, tmp_path):
    from toylens.analyze.patching import patch
    from toylens.analyze.prompts import pairs_from_prompts

    hf_model, model = tiny_gpt2
    cfg = config(tmp_path / "report", tiny_gpt2_dir)
    index = make_pretrained_report(cfg, model=model, hf_model=hf_model)
    data = json.loads((index.parent / "report.json").read_text())
    assert data["equivalence"]["passed"] is True and data["equivalence"]["max_abs_prob_diff"] < 1e-5
    pairs = pairs_from_prompts(model, CLEAN, CORRUPTED, [" Mary", " John"], [" John", " Mary"])
    for kind in cfg.patching.kinds:
        expect = patch(model, pairs, kind, progress=False).values.float()
        assert torch.allclose(torch.tensor(data["patching"]["sweeps"][kind]["values"]), expect, atol=1e-5), kind
    assert [s["id"] for s in data["sections"]] == ["model", "equivalence", "test_prompt", "patching", "tracing"]
    assert data["test_prompt"]["prompt"] == CLEAN[0]


def test_cli_pretrained_report_and_its_errors(tiny_gpt2_dir, tmp_path):
    out = tmp_path / "gpt2_report"
    args = [sys.executable, "-m", "toylens.report.cli", "model=pretrained", "model.name=gpt2",
            f"model.path={tiny_gpt2_dir}", "device=cpu", "progress=false", "analyses=[patching]",
            "patching.kinds=[resid_pre]", "patching.attribution=false",
            f"pairs.clean={json.dumps(CLEAN)}", f"pairs.corrupted={json.dumps(CORRUPTED)}",
            'pairs.answers=[" Mary"," John"]', 'pairs.wrong_answers=[" John"," Mary"]']
    ok = subprocess.run(args + [f"out={out}"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stdout.strip() == str(out / "index.html")
    assert json.loads((out / "report.json").read_text())["patching"]["n_pairs"] == 2
    no_out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert no_out.returncode == 2 and "out is required with model=pretrained" in no_out.stderr
    bad = subprocess.run(args[:4] + [f"model.path={tmp_path / 'nowhere'}", f"out={tmp_path / 'x'}"] + args[5:],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert not (tmp_path / "x").exists()


def test_pretrained_report_runs_every_analysis_that_applies(tiny_gpt2, tiny_gpt2_dir, tmp_path):
    """Default analyses: attention, DLA, logit lens, ablation (on the clean prompts' answer token, means
    over the corrupted prompts), patching and tracing run; the rest are left out with a reason. The header
    and At a glance carry the model, its size, the prompts and the seeds' headline numbers, each equal to
    a direct computation; test_prompt is a table."""
    from toylens.analyze.attribution import direct_logit_attribution
    from toylens.analyze.patching import patch
    from toylens.analyze.prompts import pairs_from_prompts
    from toylens.report.config import ANALYSES
    from toylens.report.pretrained import prompt_batch

    hf_model, model = tiny_gpt2
    cfg = config(tmp_path / "report", tiny_gpt2_dir)
    cfg.analyses = list(ANALYSES)
    cfg.patching.kinds = ["z_all_pos", "resid_pre"]
    cfg.ablation.per_head = False
    index = make_pretrained_report(cfg, model=model, hf_model=hf_model)
    data = json.loads((index.parent / "report.json").read_text())
    page = index.read_text()
    assert [s["id"] for s in data["sections"]] == ["model", "equivalence", "test_prompt", "attention", "dla",
                                                    "logit_lens", "ablation", "patching", "tracing", "discovery"]
    assert data["errors"] == []
    assert {lo["analysis"] for lo in data["left_out"]} == set(ANALYSES) - {
        "attention", "dla", "logit_lens", "ablation", "patching", "tracing", "discovery"}
    n_params = sum(p.numel() for p in model.parameters())
    assert data["header"].startswith(f"gpt2 · {n_params / 1e6:.3g}M parameters, 2 layers × 4 heads")
    assert repr(CLEAN[0]) in data["header"] and "checkpoint step ?" not in page
    pairs = pairs_from_prompts(model, CLEAN, CORRUPTED, [" Mary", " John"], [" John", " Mary"])
    with torch.no_grad():
        logits = model(pairs.clean)[:, -1]
    mary, john = model.to_single_token(" Mary"), model.to_single_token(" John")
    expect = ((logits[0, mary] - logits[0, john]) + (logits[1, john] - logits[1, mary])) / 2
    h = data["highlights"]
    assert h["logit_difference"]["clean"] == pytest.approx(float(expect), abs=1e-4)
    dla = direct_logit_attribution(model, prompt_batch(pairs), relative_to_mean=True)
    heads = sorted(((float(v), lab) for lab, v in zip(dla.labels, dla.mean, strict=True) if lab.startswith("L")),
                   key=lambda x: -abs(x[0]))[:3]
    assert [t["head"] for t in h["top_heads_dla"]] == [lab for _, lab in heads]
    z = patch(model, pairs, "z_all_pos", progress=False).values.reshape(-1)
    top = sorted(range(8), key=lambda i: -abs(float(z[i])))[:3]
    assert [t["head"] for t in h["top_heads_patching"]] == [f"L{i // 4}H{i % 4}" for i in top]
    assert "top heads by patching" in page and "logit difference (answer − wrong)" in page
    assert data["discovery"]["faithfulness"]["recovered"][-1] == pytest.approx(1.0, abs=1e-4)
    assert data["discovery"]["settings"]["n_prompts"] == 2
    tp = data["test_prompt"]
    assert "Top predictions for answer token" in page and "Tokenized prompt" not in page
    assert f'data-value="{tp["ranks"][0]}"' in page
    assert data["ablation"]["n_rows"] == 2 and data["ablation"]["n_reference_rows"] == 2
    few = {n: c for n, c in data["attention"]["score_counts"].items() if c < 10}  # 2 prompts: few queries
    assert few and all(f"{n} ({c} queries)" in page for n, c in few.items())
    assert not any(f"; {n} L" in page or f": {n} L" in page for n in few)  # not named as a head's finding


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
