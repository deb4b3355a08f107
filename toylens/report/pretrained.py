"""``toylens-analyze model=pretrained``: the intervention report of a pretrained model on prompt pairs.

    toylens-analyze model=pretrained model.name=gpt2 [model.path=<save_pretrained dir>] out=reports/gpt2 \\
        'pairs.clean=["When John and Mary went to the store, John gave a drink to"]' \\
        'pairs.corrupted=["When John and Mary went to the store, Mary gave a drink to"]' \\
        'pairs.answers=[" Mary"]' 'pairs.wrong_answers=[" John"]'

Nothing is downloaded: the weights come from the Hugging Face cache or ``model.path``. The page has
a model card, the HF-vs-TransformerLens equivalence check on the clean prompts (seed 003's),
``test_prompt`` on the first pair, then the patching and tracing sections of a run report.
"""

from __future__ import annotations

import time
from pathlib import Path

from toylens.report.build import index_figures
from toylens.report.config import INTERVENTIONS, AnalyzeConfig
from toylens.report.page import Note, Report, Section, Table
from toylens.result import jsonable
from toylens.runs.config import resolve_device


def build_pretrained_report(cfg: AnalyzeConfig, model=None, hf_model=None) -> Report:
    from toylens.analyze.pretrained import hf_equivalence, load_hf, load_pretrained
    from toylens.analyze.prompts import test_prompt
    from toylens.report import interventions as ri
    from toylens.report.sections import Context

    m = cfg.model
    device = resolve_device(cfg.device)
    if model is None:
        model = load_pretrained(m.name, m.path, device=device, processing=m.processing, dtype=m.dtype)
    ctx = Context(run=None, cfg=cfg, model=model, step=0, device=device)
    c = model.cfg
    card = {"name": m.name, "path": m.path, "processing": m.processing, "n_layers": c.n_layers,
            "d_model": c.d_model, "n_heads": c.n_heads, "d_vocab": c.d_vocab, "n_ctx": c.n_ctx,
            "n_params": sum(p.numel() for p in model.parameters())}
    ctx.data["model_card"] = card
    sections = [Section("model", f"Model card: {m.name}", "A pretrained model, loaded offline.",
                        [Table(["", "value"], [[k, v] for k, v in card.items()])])]

    eq = Section("equivalence", "Hugging Face vs TransformerLens", (
        "The same prompts through the Hugging Face model and the HookedTransformer: the next-token "
        "probabilities must agree (seed 003's check) before any analysis of the HookedTransformer means "
        "anything about the original model."))
    if hf_model is None:
        hf_model, _ = load_hf(m.name, m.path, device=device, dtype=m.dtype)
    res = hf_equivalence(hf_model, model, list(cfg.pairs.clean))
    ctx.data["equivalence"] = jsonable(res.to_dict())
    eq.blocks.append(Note(f"{'PASS' if res.passed else 'FAIL'}: max |Δ prob| = {res.max_abs_prob_diff:.3g}, "
                          f"max |Δ log-prob| = {res.max_abs_logprob_diff:.3g}", "pass" if res.passed else "fail"))
    sections.append(eq)

    tp = test_prompt(model, cfg.pairs.clean[0], cfg.pairs.answers[0])
    ctx.data["test_prompt"] = jsonable(tp.to_dict())
    sections.append(Section("test_prompt", "The first prompt", "Top predictions and the answer's rank "
                            "(TransformerLens's test_prompt).", [Note(tp.text(), "info")]))

    t0 = time.perf_counter()
    for name in INTERVENTIONS:
        if name in cfg.analyses and name != "task_vectors":
            sections.append(getattr(ri, name)(ctx))
    ctx.data["timings_s"]["total"] = round(time.perf_counter() - t0, 3)
    report = Report(title=f"toylens report: {m.name}", run_name=m.name, data=ctx.data, sections=sections)
    index_figures(report)
    return report


def make_pretrained_report(cfg: AnalyzeConfig, model=None, hf_model=None) -> Path:
    """Build and write ``cfg.out`` (index.html, report.json, plotly.min.js) atomically; returns index.html."""
    from toylens.report.html import write_report

    return write_report(build_pretrained_report(cfg, model, hf_model), Path(cfg.out), field="out")
