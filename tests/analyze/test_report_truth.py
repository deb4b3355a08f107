"""The report tells the truth about its model: what does not apply is left out with a reason (the
attention-only induction run that used to crash gets a full report), whether the model learned its
task, the task's own headline and nothing else, positional shortcuts, the positional setting, and
cautions on small statistics."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toylens.analyze.attention import attention_patterns, offset_sums, positional_shortcuts
from toylens.data import TASKS
from toylens.report.build import build_report, make_report
from toylens.report.card import learned_status
from toylens.report.config import AnalyzeConfig
from toylens.report.interventions import applicable_kinds, trace_noise
from toylens.runs.run import load_run

HALF = 6


def small(run_dir: Path, **kw) -> AnalyzeConfig:
    cfg = AnalyzeConfig(run=str(run_dir), device="cpu", progress=False, max_tokens=8, chunk_size=20, **kw)
    cfg.batch.size, cfg.reference.size, cfg.pairs.n = 40, 32, 8
    cfg.ablation.chunk_rows = 20
    cfg.tracing.n_samples = 2
    return cfg


@pytest.fixture(scope="module")
def induction_run(tmp_path_factory, tiny_run) -> Path:
    """The README's crashing example in small: task=induction on an attention-only 2-layer model
    with a learned positional embedding."""
    cls = TASKS["induction"].config_cls
    fixed = {"layout": "fixed"} if "layout" in {f.name for f in dataclasses.fields(cls)} else {}
    task = cls(n_symbols=10, half_len=HALF, **fixed)  # the fixed layout: [BOS, x_1..x_6, x_1..x_6]
    return tiny_run(tmp_path_factory.mktemp("runs") / "induction", task=task,
                    **{"model.attn_only": True, "model.d_mlp": None, "model.positional_embedding_type": "standard"})


@pytest.fixture(scope="module")
def induction_report(induction_run):
    index = make_report(load_run(induction_run), small(induction_run))
    return json.loads((index.parent / "report.json").read_text()), index.read_text()


def test_attention_only_induction_run_gets_a_full_report(induction_report):
    data, page = induction_report
    assert data["errors"] == []
    ids = [s["id"] for s in data["sections"]]
    expected = ["model", "training", "fold", "attention", "circuits", "dla", "logit_lens", "ablation", "patching",
                "tracing"]
    assert [i for i in ids if i in expected] == expected and not {"neurons", "task_vectors"} & set(ids)
    left_out = {lo["analysis"]: lo["reason"] for lo in data["left_out"]}
    assert {k: left_out.get(k) for k in ("neurons", "task_vectors")} == {
        "neurons": "the model is attention-only: it has no MLP neurons",
        "task_vectors": "task vectors need a run of the icl task (e.g. toylens-train experiment=icl_task_vectors); "
                        "this is a run of the induction task"}
    assert list(data["patching"]["sweeps"]) == ["resid_pre", "attn_out", "attn_head_all_pos_every", "z_by_pos"]
    assert "block_every&#x27;s mlp_out (attention-only model)" in page
    assert set(data["tracing"]["values"]) == {"resid", "attn"}


def test_patching_kinds_of_an_attention_only_model():
    class Cfg:
        attn_only = True

    class M:
        cfg = Cfg()

    kinds, dropped = applicable_kinds(M(), ["block_every", "mlp_out", "resid_mid", "z_all_pos", "attn_out"])
    assert kinds == ["resid_pre", "attn_out", "z_all_pos"] and len(dropped) == 3
    Cfg.attn_only = False
    assert applicable_kinds(M(), ["block_every", "mlp_out"]) == (["block_every", "mlp_out"], [])


def test_model_card_states_the_positional_setting(induction_run, induction_report):
    data, page = induction_report
    norm = float(load_run(induction_run).model().W_pos.detach().norm())
    assert data["model_card"]["positional_embedding_type"] == "standard"
    assert f"learned absolute embedding W_pos (norm {norm:.4g})" in page
    assert "must have norm 0" not in page and "&#x27;none&#x27;" not in page


class _Fixed(torch.nn.Module):
    """A stand-in model whose logits are given: the targets (a perfect model) or a constant."""

    def __init__(self, d_vocab, perfect):
        super().__init__()
        self.cfg = type("Cfg", (), {"d_vocab": d_vocab})()
        self.perfect, self.targets = perfect, None

    def forward(self, tokens):
        if self.perfect:
            return torch.nn.functional.one_hot(self.targets[: tokens.shape[0]].clamp(min=0), self.cfg.d_vocab).float()
        return torch.zeros(*tokens.shape, self.cfg.d_vocab)


def test_learned_against_the_tasks_chance_level():
    task = TASKS["prev_token"](TASKS["prev_token"].config_cls(d_vocab=10, seq_len=12))
    batch = task.eval_set(400, 0)
    mask = batch.loss_mask
    freq = torch.bincount(batch.targets[mask], minlength=10).float() / mask.sum()  # one position layout here
    perfect = _Fixed(10, True)
    perfect.targets = batch.targets
    good = learned_status(perfect, task, batch, None, chunk_size=400)
    assert good["verdict"] == "learned the task" and good["batch_accuracy"] == 1.0
    by_pos = [torch.bincount(batch.targets[:, p][mask[:, p]], minlength=10).max() for p in range(12)]
    assert good["chance"] == pytest.approx(float(sum(by_pos)) / float(mask.sum()), abs=1e-6)
    assert good["chance"] >= float(freq.max()) - 1e-6
    bad = learned_status(_Fixed(10, False), task, batch, 0.11, chunk_size=400)
    assert bad["verdict"].startswith("did not learn") and bad["accuracy"] == 0.11 and bad["kind"] == "fail"
    assert "against chance" in bad["text"]
    assert learned_status(_Fixed(10, False), task, batch, 0.6)["verdict"] == "partly learned the task"


def test_at_a_glance_headline_belongs_to_the_task(induction_report, tmp_path, tiny_run):
    data, page = induction_report
    labels = [r[0] for r in data["highlights"]["rows"]]
    assert any(lab.startswith("induction head") for lab in labels) and "previous-token head" not in labels
    assert labels[0] == "learned the task?" and data["learned"]["chance"] > 0
    run_dir = tiny_run(tmp_path / "copy", task=TASKS["copy"].config_cls())
    report = build_report(load_run(run_dir), small(run_dir, analyses=["attention"]))
    rows = report.data["highlights"]["rows"]
    assert report.data["highlights"]["task_headline"] == []
    assert not any("head" in r[0] for r in rows), rows


# --- positional shortcuts -----------------------------------------------------------------------
def test_offset_sums_on_a_known_pattern():
    n = 5
    pattern = torch.zeros(1, 2, n, n)
    for q in range(n):
        pattern[0, 0, q, max(q - 2, 0)] = 1.0  # head 0: two back (or BOS)
        pattern[0, 1, q, : q + 1] = 1.0 / (q + 1)  # head 1: uniform
    w = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0]])
    s = offset_sums(pattern, w)
    assert s[0].tolist() == [0, 0, 3, 0, 0]
    assert s[1].tolist() == pytest.approx([1 / 3 + 1 / 4 + 1 / 5, 1 / 3 + 1 / 4 + 1 / 5, 1 / 3 + 1 / 4 + 1 / 5,
                                           1 / 4 + 1 / 5, 1 / 5])


def _force_pattern(model, layer, head, fn):
    """Replace one head's attention pattern by ``fn(tokens-independent pattern shape)``."""
    def hook(pattern, hook):
        pattern = pattern.clone()
        pattern[:, head] = fn(pattern.shape[-1], pattern.device)
        return pattern

    model.add_hook(f"blocks.{layer}.attn.hook_pattern", hook)


def _offset(n, device, d):
    p = torch.zeros(n, n, device=device)
    for q in range(n):
        p[q, max(q - d, 0)] = 1.0
    return p


def test_a_fixed_offset_head_is_flagged_and_a_content_head_is_not(induction_run):
    """L0H0 forced to attend HALF-1 back (the induction key of the fixed layout, whatever the tokens):
    flagged, its induction score shown as positional. A real induction pattern computed from the
    tokens (L1H0) keeps a high induction score but is not flagged: shuffled tokens move its attention."""
    run = load_run(induction_run)
    model = run.model()
    _force_pattern(model, 0, 0, lambda n, dev: _offset(n, dev, HALF - 1))
    batch = run.batch(60, 0)
    plain = attention_patterns(model, batch)
    assert plain.scores["induction"][0, 0] > 0.8  # chance repeats in the first half make up the rest
    flagged = positional_shortcuts(model, batch, plain)
    assert flagged["L0H0"]["offset"] == HALF - 1 and flagged["L0H0"]["share"] > 0.9
    assert flagged["L0H0"]["share_shuffled"] > 0.9

    model.reset_hooks()
    tokens_seen = {}

    def induction_pattern(pattern, hook):  # attend to the token after the previous occurrence of the query's
        t = tokens_seen["t"]
        b, n = t.shape
        prev = torch.cat([t.new_full((b, 1), -1), t[:, :-1]], 1)
        m = (t[:, :, None] == prev[:, None, :]) & (torch.arange(n)[None, :] < torch.arange(n)[:, None])[None]
        p = torch.where(m.any(-1, keepdim=True), m.float(), torch.eye(n)[None].expand(b, n, n))
        pattern = pattern.clone()
        pattern[:, 0] = p / p.sum(-1, keepdim=True)
        return pattern

    orig = model.run_with_hooks

    def run_with_hooks(rows, fwd_hooks=(), **kw):
        tokens_seen["t"] = rows
        return orig(rows, fwd_hooks=[("blocks.1.attn.hook_pattern", induction_pattern)] + list(fwd_hooks), **kw)

    model.run_with_hooks = run_with_hooks
    res = attention_patterns(model, batch)
    assert res.scores["induction"][1, 0] > 0.8
    assert "L1H0" not in positional_shortcuts(model, batch, res)


def test_report_states_the_positional_shortcut(induction_run, tmp_path):
    run = load_run(induction_run)
    model = run.model()
    _force_pattern(model, 1, 1, lambda n, dev: _offset(n, dev, HALF - 1))
    report = build_report(run, small(induction_run, analyses=["attention"]), model=model)
    shortcuts = report.data["attention"]["positional_shortcuts"]
    assert shortcuts["L1H1"]["offset"] == HALF - 1
    rows = dict((r[0], r[1]) for r in report.data["highlights"]["rows"])
    assert rows["induction head"].startswith("L1H1") and "positional shortcut" in rows["induction head"]
    from toylens.report.html import render

    page = render(report)
    assert "Positional shortcut: L1H1&#x27;s induction score" in page and f"−{HALF - 1}: 1.00" in page


# --- small statistics ---------------------------------------------------------------------------
def test_small_correlations_and_all_noised_traces_carry_a_caution(induction_report):
    data, page = induction_report
    cells = data["patching"]["attribution_cells"]
    n_resid = torch.tensor(data["patching"]["sweeps"]["resid_pre"]["values"]).numel()
    assert cells["z_all_pos"] == 2 * 2 and cells["resid_pre"] == n_resid >= 10
    assert "only 4 cells: too few to judge" in page
    assert f"only {n_resid} cells" not in page


def test_trace_noise_defaults_to_the_differing_positions():
    from toylens.analyze.pairs import PromptPairs

    clean = torch.tensor([[0, 1, 2, 3, 4], [0, 5, 6, 7, 8]])
    corrupted = torch.tensor([[0, 1, 9, 3, 4], [0, 5, 6, 9, 8]])
    answers = torch.tensor([[[4], [9]], [[8], [9]]])
    pairs = PromptPairs(clean, corrupted, torch.tensor([4, 4]), answers)
    mask, how, every = trace_noise(pairs, 2, [])
    assert mask.tolist() == [[False, False, True, False, False], [False, False, False, True, False]]
    assert not every and "differ" in how
    _, _, every = trace_noise(pairs, 2, [0, 1, 2, 3])
    assert every


def test_cli_strict_exit_code(induction_run, tmp_path):
    """A failing analysis (tracing asked to noise a position the prompts do not have): exit 0 with the
    error in its section; strict=true: exit 1 and one line, the report written either way."""
    args = [sys.executable, "-m", "toylens.report.cli", f"run={induction_run}", "device=cpu", "progress=false",
            "analyses=[attention,tracing]", "tracing.noise=[999]", "batch.size=20", "pairs.n=4"]
    ok = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    index = Path(ok.stdout.strip().splitlines()[-1])  # report/, or report-attention+tracing/ beside a fuller one
    data = json.loads((index.parent / "report.json").read_text())
    assert [e["analysis"] for e in data["errors"]] == ["tracing"] and "999" in data["errors"][0]["error"]
    assert "scores_by_head" in data["attention"]
    strict = subprocess.run(args + ["strict=true"], capture_output=True, text=True, timeout=300)
    assert strict.returncode == 1 and "strict=true" in strict.stderr and "Traceback" not in strict.stderr
    assert len([ln for ln in strict.stderr.splitlines() if "error" in ln]) == 1, strict.stderr


def test_task_headline_rows_per_task():
    from toylens.report.glance import task_headline

    scores = {"L0H0": {"previous_token": 0.9, "induction": 0.1}, "L0H1": {"previous_token": 0.2, "induction": 0.7},
              "L1H0": {"previous_token": 0.1, "induction": 0.6}, "L1H1": {"previous_token": 0.0, "induction": 0.2}}

    def data(task, **kw):
        return {"run": {"task": {"name": task}}, "model_card": {"n_layers": 2},
                "attention": {"scores_by_head": scores, "positional_shortcuts": {}}, **kw}

    assert task_headline(data("prev_token")) == [["previous-token head", "L0H0 (previous_token score 0.900)"]]
    # induction: the best head of a later layer (L0H1 cannot compose), and its earlier-layer partner
    assert task_headline(data("induction")) == [["induction head", "L1H0 (induction score 0.600)"],
                                                ["its partner (previous-token head in an earlier layer)",
                                                 "L0H0 (previous_token score 0.900)"]]
    circuit = {"circuit": {"found": True, "induction_head": "L1H0", "line": "L1H0 reads L0H0"}}
    assert task_headline(data("induction", induction=circuit)) == [["induction head and partner", "L1H0 reads L0H0"]]
    assert task_headline(data("modular_add")) == []  # no Fourier section: nothing task-specific
    assert task_headline(data("modular_add", fourier={"key_freqs": [14, 35], "key_share": 0.9})) == [
        ["key frequencies", "14, 35 (90.0% of the embedding's squared norm)"]]
    for task in ("sort", "copy", "brackets", "icl", "reverse"):
        assert task_headline(data(task)) == [], task
    shortcut = data("induction")
    shortcut["attention"]["positional_shortcuts"] = {"L1H0": {"offset": 15, "share": 0.8, "share_shuffled": 0.79}}
    assert "positional shortcut: 0.80 of its attention goes 15 tokens back" in task_headline(shortcut)[0][1]
