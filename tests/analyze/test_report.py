"""The report: what it computes (checked against independent computations), what it writes, and
that writing is atomic. The browser-side checks are in test_report_browser.py."""

from __future__ import annotations

import csv
import html
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from plotly.offline import get_plotlyjs

from toylens.model.build import fold_layer_norm
from toylens.model.fold import max_logprob_diff
from toylens.report import sections as report_sections
from toylens.report.build import build_report, make_report
from toylens.report.circuitsvis_views import bundle_path
from toylens.report.config import AnalyzeConfig, validate
from toylens.report.html import write_report
from toylens.runs.config import ConfigError
from toylens.runs.run import load_run

ROWS, REF_ROWS, SHOWN = 48, 40, 8


def small_config(run_dir: Path, **kw) -> AnalyzeConfig:
    cfg = AnalyzeConfig(run=str(run_dir), device="cpu", progress=False, max_tokens=SHOWN, chunk_size=20, **kw)
    cfg.batch.size, cfg.reference.size = ROWS, REF_ROWS
    cfg.ablation.chunk_rows = 20
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_run) -> Path:
    return tiny_run(tmp_path_factory.mktemp("runs") / "tiny")


@pytest.fixture(scope="module")
def written(trained):
    """The full report of the tiny run, written to <run>/report."""
    run = load_run(trained)
    index = make_report(run, small_config(trained))
    data = json.loads((index.parent / "report.json").read_text(),
                      parse_constant=lambda c: pytest.fail(f"report.json holds {c}"))
    return run, index, data, index.read_text()


def _nll(logits, batch):
    return F.cross_entropy(logits[batch.loss_mask], batch.targets[batch.loss_mask]).item()


def test_report_folder_is_complete_and_offline(written):
    run, index, data, page = written
    folder = index.parent
    assert folder == run.path / "report"
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [  # dotfiles: toylens's marks
        "ablation.csv", "circuitsvis.js", "index.html", "plotly.min.js", "report.json"]
    assert (folder / "plotly.min.js").read_text() == get_plotlyjs()
    assert (folder / "circuitsvis.js").read_bytes() == bundle_path().read_bytes()  # CircuitsVis's views, once
    srcs = re.findall(r"<script[^>]*\bsrc=\"([^\"]*)\"", page)
    assert srcs == ["plotly.min.js", "circuitsvis.js"]
    assert not re.search(r"(src|href)=\"(https?:)?//", page) and "cdn." not in page
    # every figure listed in report.json has its div and its data, and nothing else is a figure
    divs = re.findall(r'<div class="tl-plot" id="([^"]+)"', page)
    assert divs == [f["id"] for f in data["figures"]]
    for fig_id in divs:
        m = re.search(rf'<script type="application/json" id="data-{re.escape(fig_id)}">(.*?)</script>', page)
        spec = json.loads(m.group(1))
        assert spec["data"] and "template" not in spec["layout"]
    names = {f["name"] for f in data["figures"]}
    for name in ("training/loss", "training/accuracy", "attention/L0H0", "attention/L1H1", "attention/head_scores",
                 "circuits/qk_token/L1H0", "circuits/ov_logit/L0H1", "circuits/copying_score", "dla/components",
                 "dla/per_pos", "logit_lens/loss", "neurons/layer0_frequency", "neurons/dead", "ablation/ranked"):
        assert name in names, name
    expected = ["model", "training", "fold", "attention", "circuits", "dla", "logit_lens", "neurons", "ablation",
                "patching", "tracing"]  # in this order; sections other work adds may sit between them
    assert [s["id"] for s in data["sections"] if s["id"] in expected] == expected
    assert {"induction", "fourier", "task_vectors"} <= {lo["analysis"] for lo in data["left_out"]}
    assert data["errors"] == []
    assert 'data-analysis="task_vectors"' in page and "left out: task vectors need a run of the icl task" in page
    for s in data["sections"]:
        assert f'<section id="{s["id"]}">' in page and f'href="#{s["id"]}"' in page  # table of contents


def test_model_card_and_training_numbers(written):
    run, _, data, page = written
    model = run.model()
    card = data["model_card"]
    assert card["w_pos_norm"] == 0.0 and card["positional_embedding_type"] == "none"
    assert card["n_params"] == sum(p.numel() for p in model.parameters())
    assert card["n_trainable_params"] == card["n_params"] - model.W_pos.numel()
    assert data["run"]["step"] == 20 and data["run"]["steps"] == [10, 20]
    evals = [r for r in run.metrics if "eval/loss" in r]
    assert data["training"]["eval/loss"] == {"step": [r["step"] for r in evals],
                                             "value": [r["eval/loss"] for r in evals]}
    assert data["config"]["model.d_model"] == 32 and data["config"]["task.d_vocab"] == 20


def test_fold_number_matches_an_independent_check(written):
    run, _, data, page = written
    model = run.model()
    batch = run.batch(ROWS, AnalyzeConfig().batch.seed)
    expected = max_logprob_diff(model, fold_layer_norm(model), batch.tokens, dtype=torch.float64)
    assert data["fold"]["max_abs_logprob_diff"] == pytest.approx(expected, abs=1e-6)
    assert data["fold"]["passed"] is True and data["fold"]["n_tokens_checked"] == batch.tokens.numel()
    assert f"PASS: max |Δ log-prob| = {expected:.3g}" in page


def test_previous_token_scores_match_the_patterns(written):
    run, _, data, page = written
    model = run.model()
    batch = run.batch(ROWS, AnalyzeConfig().batch.seed)
    _, cache = model.run_with_cache(batch.tokens)
    best, best_score = None, -1.0
    for layer in range(2):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]  # [batch, head, query, key]
        for head in range(2):
            q = torch.arange(1, 12)
            score = pattern[:, head, q, q - 1].mean().item()
            label = f"L{layer}H{head}"
            assert data["attention"]["scores_by_head"][label]["previous_token"] == pytest.approx(score, abs=1e-5)
            if score > best_score:
                best, best_score = label, score
    assert data["attention"]["previous_token_head"]["head"] == best
    assert data["highlights"]["previous_token_head"]["head"] == best
    assert f"{best} (previous_token score {best_score:.3f})" in page


def test_ablation_matches_a_naive_mean_ablation_and_the_csv(written):
    run, index, data, _ = written
    model = run.model()
    seeds = AnalyzeConfig()
    batch, ref = run.batch(ROWS, seeds.batch.seed), run.batch(REF_ROWS, seeds.reference.seed)
    abl = data["ablation"]
    with torch.no_grad():
        assert abl["clean_loss"] == pytest.approx(_nll(model(batch.tokens), batch), rel=1e-5)
        _, cache = model.run_with_cache(ref.tokens)
        mean = cache["hook_embed"].mean(0)
        logits = model.run_with_hooks(batch.tokens, fwd_hooks=[("hook_embed", lambda a, hook: mean.expand_as(a))])
    row = next(r for r in abl["rows"] if r["hook"] == "hook_embed")
    assert row["loss"] == pytest.approx(_nll(logits, batch), rel=1e-5)
    deltas = [r["delta_loss"] for r in abl["rows"]]
    assert deltas == sorted(deltas, reverse=True) and len(deltas) > 30
    assert {"L0H0", "L1H1"} <= {r["hook"] for r in abl["rows"]}  # heads ablated one by one (n_heads=2)
    with open(index.parent / "ablation.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["hook"], r["mode"], float(r["loss"])) for r in rows] == \
        [(r["hook"], r["mode"], r["loss"]) for r in abl["rows"]]
    assert data["logit_lens"]["loss"][-1] == pytest.approx(abl["clean_loss"], rel=1e-4)


def test_page_tables_show_the_json_numbers(written):
    _, _, data, page = written
    tables = re.findall(r"<table.*?</table>", page, flags=re.S)
    ablation = next(t for t in tables if "Every ablation" in t)
    assert 'class="sortable"' in ablation
    assert ablation.count("<tr>") + ablation.count('<tr class="hl">') == len(data["ablation"]["rows"]) + 1
    for r in data["ablation"]["rows"][:5]:
        assert f'data-value="{r["delta_loss"]!r}"' in ablation
    n_dead = data["neurons"]["n_dead"]
    neuron_table = next(t for t in tables if "dead neurons" in t)
    assert f'data-value="{n_dead[0]}"' in neuron_table and f'data-value="{n_dead[1]}"' in neuron_table
    assert "At a glance" in page and data["highlights"]["w_pos_norm"] == 0.0


def test_circuits_show_a_readable_token_subset(written):
    _, _, data, page = written
    c = data["circuits"]
    assert c["shown_token_ids"] == list(range(SHOWN)) and c["d_vocab"] == 20
    assert c["shown_token_names"][0] == "BOS"
    assert len(c["qk_token"]) == 2 and len(c["qk_token"][0][0]) == SHOWN and len(c["qk_token"][0][0][0]) == SHOWN
    assert f"first {SHOWN} of 20 tokens" in page
    assert set(c["scores_by_head"]) == {"L0H0", "L0H1", "L1H0", "L1H1"}


def test_only_the_requested_analyses(trained, tmp_path):
    run = load_run(trained)
    report = build_report(run, small_config(trained, analyses=["attention"]))
    index = write_report(report, tmp_path / "report")
    data = json.loads((index.parent / "report.json").read_text())
    assert "attention" in data and not {"ablation", "fold", "circuits", "neurons"} & set(data)
    assert {f["name"].split("/")[0] for f in data["figures"]} == {"training", "attention"}
    assert not (index.parent / "ablation.csv").exists()


def test_failed_write_keeps_the_previous_report(trained, tmp_path, monkeypatch):
    run = load_run(trained)
    report = build_report(run, small_config(trained, analyses=["attention", "ablation"]))
    out = tmp_path / "report"
    write_report(report, out)
    (out / "sentinel").write_text("previous report")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(path):
        Path(path).write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(report.ablation, "to_csv", broken)
    with pytest.raises(OSError, match="disk full"):
        write_report(report, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no temp folder left
    monkeypatch.undo()
    write_report(report, out)
    assert not (out / "sentinel").exists() and (out / "ablation.csv").read_text().startswith("hook,mode")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # the old one is gone


def test_failed_analysis_is_shown_and_the_rest_is_written(trained, tmp_path, monkeypatch):
    """One analysis that raises becomes a section holding its error; the others are still computed and
    the report is written. strict=true then makes make_report raise (the CLI's exit 1), after writing."""
    from toylens.report.build import AnalysisFailed

    run_dir = Path(shutil.copytree(trained, tmp_path / "run", ignore=shutil.ignore_patterns("report")))

    def boom(ctx):
        raise RuntimeError("analysis crashed")

    monkeypatch.setattr(report_sections, "neurons", boom)
    index = make_report(load_run(run_dir), small_config(run_dir, analyses=["attention", "neurons"]))
    data = json.loads((index.parent / "report.json").read_text())
    assert data["errors"] == [{"analysis": "neurons", "error": "RuntimeError: analysis crashed"}]
    assert data["neurons"] == {"error": "RuntimeError: analysis crashed"} and "scores_by_head" in data["attention"]
    page = index.read_text()
    assert "FAILED: RuntimeError: analysis crashed" in page and 'id="fig-attention-L0H0"' in page
    index.unlink()
    with pytest.raises(AnalysisFailed, match="1 analysis.*failed.*analysis crashed"):
        make_report(load_run(run_dir), small_config(run_dir, analyses=["attention", "neurons"], strict=True))
    assert index.exists()  # written before the strict check

    def bad_input(ctx):
        raise ConfigError("dynamics.steps=[7]: no checkpoint at step 7")

    monkeypatch.setattr(report_sections, "neurons", bad_input)  # the user's input: one line, nothing written
    shutil.rmtree(index.parent)
    with pytest.raises(ConfigError, match="step 7"):
        make_report(load_run(run_dir), small_config(run_dir, analyses=["attention", "neurons"]))
    assert not index.parent.exists()


def test_failed_fold_check_is_shown_not_hidden(trained, tmp_path, monkeypatch):
    import toylens.model.fold as fold_module

    monkeypatch.setattr(fold_module, "max_logprob_diff", lambda *a, **k: 0.5)
    report = build_report(load_run(trained), small_config(trained, analyses=["fold", "circuits"]))
    assert report.data["fold"]["passed"] is False and report.data["fold"]["max_abs_logprob_diff"] == 0.5
    page = write_report(report, tmp_path / "report").read_text()
    assert "FAIL: max |Δ log-prob| = 0.5 (&gt; tolerance 0.0001)" in page
    assert "use the unfolded weights" in page


@pytest.mark.parametrize("change,needle", [
    (dict(analyses=["attention", "atention"]), "'atention' is not an analysis"),
    (dict(batch_size=0), "batch.size=0 must be positive"),
    (dict(reference_size=-5), "reference.size=-5 must be positive"),
    (dict(modes=["mean", "median"]), "ablation.modes=['mean', 'median']"),
    (dict(modes=[]), "ablation.modes=[]"),
    (dict(chunk_size=0), "chunk_size=0"),
    (dict(fold_tol=0.0), "fold_tol=0.0"),
    (dict(device="tpu"), "device='tpu'"),
    (dict(run=""), "run is required"),
])
def test_validate_names_the_field(change, needle):
    cfg = AnalyzeConfig(run="somewhere")
    for key, value in change.items():
        if key == "batch_size":
            cfg.batch.size = value
        elif key == "reference_size":
            cfg.reference.size = value
        elif key == "modes":
            cfg.ablation.modes = value
        else:
            setattr(cfg, key, value)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_wandb_run_gets_the_report_offline(trained, tmp_path, monkeypatch):
    """A run trained with logger=wandb: the report goes to the same wandb run id, offline here."""
    from toylens.runs import checkpoint as ck

    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = Path(shutil.copytree(trained, tmp_path / "run", ignore=shutil.ignore_patterns("report")))
    cfg_path = run_dir / ".hydra" / "config.yaml"
    text = cfg_path.read_text()
    assert "logger:\n  name: none" in text
    cfg_path.write_text(text.replace("logger:\n  name: none", "logger:\n  name: wandb"))
    state = ck.load_state(run_dir, 20)
    state["wandb_id"] = "tlreport01"
    torch.save(state, ck.state_path(run_dir, 20))
    run = load_run(run_dir)
    assert run.wandb_id() == "tlreport01"
    make_report(run, small_config(run_dir, analyses=["attention", "ablation"]))
    runs = list((run_dir / "wandb").glob("offline-run-*-tlreport01"))
    assert len(runs) == 1, list((run_dir / "wandb").iterdir())
    files = runs[0] / "files" / "media"
    html_files = list(files.glob("html/analyze/report_*.html"))
    tables = list(files.glob("table/analyze/ablation_*.table.json"))
    assert len(html_files) == 1 and len(tables) == 1
    page = html_files[0].read_text()
    assert "toylens report: tiny/run" in page and "plotly.js v" in page  # self-contained copy
    table = json.loads(tables[0].read_text())
    data = json.loads((run_dir / "report" / "report.json").read_text())
    assert table["columns"] == ["rank", "hook", "mode", "loss", "delta_loss", "accuracy"]
    assert [r[1] for r in table["data"]] == [r["hook"] for r in data["ablation"]["rows"]]
    record = (runs[0] / "run-tlreport01.wandb").read_bytes()
    assert b"analyze/attention/previous_token_head/head" in record
    assert not math.isnan(data["ablation"]["clean_loss"])


def test_intervention_sections_equal_direct_calls(written):
    """Patching, attribution patching and tracing numbers in report.json are those of the functions
    called directly on the same pairs; task vectors say why they are skipped on a prev_token run."""
    from toylens.analyze.attribution_patching import attribution_patch, correlation
    from toylens.analyze.patching import patch
    from toylens.analyze.prompts import pairs_from_task
    from toylens.analyze.tracing import causal_trace

    run, _, data, page = written
    cfg = small_config(run.path)
    model = run.model()
    pairs = pairs_from_task(run.task, cfg.pairs.n, cfg.pairs.seed)
    p = data["patching"]
    assert p["n_pairs"] == cfg.pairs.n and set(p["sweeps"]) == set(cfg.patching.kinds)
    for kind in cfg.patching.kinds:
        expect = patch(model, pairs, kind, progress=False)
        got = torch.tensor(p["sweeps"][kind]["values"])
        assert torch.allclose(got, expect.values.float(), atol=1e-5), kind
    attr = attribution_patch(model, pairs, cfg.patching.kinds)
    exact = patch(model, pairs, "block_every", progress=False)
    assert p["attribution_correlation"]["resid_pre"] == pytest.approx(
        correlation(attr["block_every"].sub("resid_pre"), exact.sub("resid_pre")), abs=1e-6)
    n = cfg.tracing.prompts
    before = torch.arange(pairs.n_pos)[None, :] < pairs.answer_pos[:n, None]
    noise = (pairs.clean[:n] != pairs.corrupted[:n]) & before  # the positions the pairs differ in
    assert bool(noise.any(-1).all()) and not bool(noise[before].all())
    assert data["tracing"]["every_position_noised"] is False
    tr = causal_trace(model, pairs.clean[:n], pairs.answer_pos[:n], pairs.answers[:n, 0, 0], noise,
                      n_samples=cfg.tracing.n_samples, seed=cfg.tracing.seed, progress=False)
    assert data["tracing"]["clean"] == pytest.approx(tr.clean, abs=1e-6)
    assert data["tracing"]["noised"] == pytest.approx(tr.noised, abs=1e-6)
    for kind, v in tr.values.items():
        assert torch.allclose(torch.tensor(data["tracing"]["values"][kind]), v.float(), atol=1e-6), kind
    assert "task_vectors" not in data and "left out: task vectors need a run of the icl task" in page


def test_task_vector_section_equals_direct_calls(tmp_path, tiny_run):
    """On an icl run the section holds both sites' results, each equal to ``task_vectors`` called
    directly, and the overall best of the two."""
    from toylens.analyze.task_vectors import SITES, task_vectors
    from toylens.data import TASKS

    task = TASKS["icl"].config_cls(n_symbols=6, group_size=1, rule="shift", ks=[1, 3], n_demos=2, fillers=2)
    run_dir = tiny_run(tmp_path / "icl", task=task, **{"model.positional_embedding_type": "rotary"})
    run = load_run(run_dir)
    cfg = small_config(run_dir, analyses=["task_vectors"])
    cfg.task_vectors.n = 12
    report = build_report(run, cfg)
    index = write_report(report, tmp_path / "report")
    data = json.loads((index.parent / "report.json").read_text())["task_vectors"]
    page = index.read_text()
    for site in SITES:
        direct = task_vectors(run.model(), run.task, site=site, n=12, seed=cfg.task_vectors.seed, progress=False)
        assert torch.allclose(torch.tensor(data[site]["accuracy"]), direct.accuracy, atol=1e-6)
        assert data[site]["zero_shot_baseline"] == pytest.approx(direct.zero_shot_baseline.tolist())
        best = direct.best()
        assert data[site]["best"]["site"] == site and data[site]["best"]["hook"] == best["hook"]
        for key in ("accuracy", "zero_shot_baseline", "demo_baseline", "swap_follows_vector"):
            assert data[site]["best"][key] == pytest.approx(best[key], abs=1e-6), key
        assert html.escape(f"At the {SITES[site]}, best point {best['hook']}") in page
    assert data["best"] == max((data[s]["best"] for s in SITES), key=lambda b: b["accuracy"])
