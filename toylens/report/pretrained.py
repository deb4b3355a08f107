"""``toylens-analyze model=pretrained``: the report of a pretrained model on prompt pairs, as seeds 002/003.

    toylens-analyze model=pretrained model.name=gpt2 [model.path=<save_pretrained dir>] out=reports/gpt2 \\
        'pairs.clean=["When John and Mary went to the store, John gave a drink to"]' \\
        'pairs.corrupted=["When John and Mary went to the store, Mary gave a drink to"]' \\
        'pairs.answers=[" Mary"]' 'pairs.wrong_answers=[" John"]'

Nothing is downloaded: the weights come from the Hugging Face cache or ``model.path``. The page has
a model card, the HF-vs-TransformerLens check on the clean prompts (seed 003's), ``test_prompt`` on
the first pair as a table, then every analysis that applies to a pretrained model: attention, direct
logit attribution, logit lens and every-hook ablation on the clean prompts (scored on the answer
token; ablation replaces activations by their mean over the corrupted prompts), activation patching
and causal tracing. "At a glance" has the seed notebooks' headline numbers: the logit difference,
and the top heads by DLA and by patching.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from toylens.report.build import check_strict, index_figures, run_builders
from toylens.report.config import AnalyzeConfig
from toylens.report.page import Note, Report, Section, Table
from toylens.report.registry import resolve_all
from toylens.result import jsonable
from toylens.runs.config import resolve_device

# Which sections a pretrained model's report runs, and why the others are left out: each registry entry's
# ``pretrained`` (toylens/report/registry.py); the user's own analyses run with run=None.


def prompt_batch(pairs, answers: bool = True):
    """The clean (or corrupted) prompts as a Batch scored on one position: the first answer token."""
    from toylens.data.base import Batch

    tokens = pairs.clean if answers else pairs.corrupted
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    targets = torch.zeros_like(tokens)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    targets[rows, pairs.answer_pos] = pairs.answers[:, 0 if answers else 1, 0]
    mask[rows, pairs.answer_pos] = True
    return Batch(tokens, targets, mask)


@torch.no_grad()
def logit_difference(model, pairs) -> dict:
    """Mean logit(answer) - logit(wrong answer) at the answer position (first answer tokens), clean and corrupted."""
    out = {}
    rows = torch.arange(pairs.batch_size)
    for name, tokens in (("clean", pairs.clean), ("corrupted", pairs.corrupted)):
        logits = model(tokens)[rows, pairs.answer_pos]
        diff = logits[rows, pairs.answers[:, 0, 0]] - logits[rows, pairs.answers[:, 1, 0]]
        out[name] = float(diff.mean())
        out[f"{name}_per_prompt"] = diff.tolist()
    return out


def _top_heads(labels: list[str], values: list[float], k: int = 3) -> list[dict]:
    heads = [(v, lab) for lab, v in zip(labels, values, strict=True) if re.fullmatch(r"L\d+H\d+", lab)]
    return [{"head": lab, "value": v} for v, lab in sorted(heads, key=lambda x: -abs(x[0]))[:k]]


def _patching_heads(data: dict, k: int = 3) -> list[dict]:
    """Top heads of the z (head output) patching sweep, whichever form it was run in."""
    sweeps = data.get("patching", {}).get("sweeps", {})
    for name, sweep in sweeps.items():
        values, dims = torch.tensor(sweep["values"]), sweep["dims"]
        if name == "attn_head_all_pos_every":
            values, dims = values[sweep["labels"]["patch_type"].index("z_all_pos")], dims[1:]
        elif name != "z_all_pos":
            continue
        assert dims == ["layer", "head_index"], dims
        labels = [f"L{layer}H{h}" for layer in range(values.shape[0]) for h in range(values.shape[1])]
        return _top_heads(labels, values.reshape(-1).tolist(), k)
    return []


def pretrained_highlights(data: dict) -> dict:
    ld = data["logit_difference"]
    rows = [["logit difference (answer − wrong)", f"clean {ld['clean']:.4g}, corrupted {ld['corrupted']:.4g} "
                                                  f"(mean over {len(ld['clean_per_prompt'])} pairs)"]]
    eq = data.get("equivalence", {})
    if eq:
        rows.append(["HF vs TransformerLens", f"{'PASS' if eq['passed'] else 'FAIL'}: max |Δ prob| "
                                              f"{eq['max_abs_prob_diff']:.3g}"])
    h = {"logit_difference": ld, "rows": rows}
    if "labels" in data.get("dla", {}):
        h["top_heads_dla"] = _top_heads(data["dla"]["labels"], data["dla"]["mean"])
        rows.append(["top heads by DLA (answer logit − mean)",
                     ", ".join(f"{t['head']} ({t['value']:+.3g})" for t in h["top_heads_dla"])])
    h["top_heads_patching"] = _patching_heads(data)
    if h["top_heads_patching"]:
        rows.append(["top heads by patching (z, all positions)",
                     ", ".join(f"{t['head']} ({t['value']:.3g})" for t in h["top_heads_patching"])])
    for e in data.get("errors", []):
        rows.append([f"{e['analysis']} failed", e["error"]])
    return h


def _test_prompt_section(tp) -> Section:
    blocks: list = [Table(["answer token", "rank", "logit", "prob"],
                          [[t, int(tp.ranks[i]), float(tp.answer_logits[i]), float(tp.answer_probs[i])]
                           for i, t in enumerate(tp.answer_str_tokens)],
                          caption=f"Prompt {tp.prompt!r} → answer {tp.answer!r} (rank 0: the top prediction)")]
    for i, t in enumerate(tp.answer_str_tokens):
        top = tp.top_tokens[i].tolist()
        blocks.append(Table(["rank", "token", "logit", "prob"],
                            [[j, tp.top_str_tokens[i][j], float(tp.top_logits[i, j]), float(tp.top_probs[i, j])]
                             for j in range(len(top))], caption=f"Top predictions for answer token {t!r}",
                            highlight={j for j, tok in enumerate(top) if tok == int(tp.answer_tokens[i])}))
    return Section("test_prompt", "The first prompt", (
        "TransformerLens's test_prompt: the answer's rank, logit and probability, and the model's top "
        "predictions at each answer token (the answer in bold when it is among them)."), blocks)


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
    pairs = ri.pairs_for(ctx)  # bad prompts raise here, before any work (PairsError: one line)
    ctx.__dict__["batch"] = prompt_batch(pairs)
    ctx.__dict__["reference"] = prompt_batch(pairs, answers=False)
    c = model.cfg
    n_params = sum(p.numel() for p in model.parameters())
    card = {"name": m.name, "path": m.path, "processing": m.processing, "n_layers": c.n_layers,
            "d_model": c.d_model, "n_heads": c.n_heads, "d_mlp": c.d_mlp, "d_vocab": c.d_vocab, "n_ctx": c.n_ctx,
            "n_params": n_params, "n_pairs": pairs.batch_size, "prompt_tokens": pairs.n_pos}
    ctx.data["model_card"] = card
    ctx.data["prompts"] = {k: list(getattr(cfg.pairs, k)) for k in ("clean", "corrupted", "answers", "wrong_answers")}
    ctx.data["header"] = (f"{m.name} · {n_params / 1e6:.3g}M parameters, {c.n_layers} layers × {c.n_heads} heads, "
                          f"d_model {c.d_model} · {pairs.batch_size} prompt pair(s) of {pairs.n_pos} tokens, e.g. "
                          f"{cfg.pairs.clean[0]!r} → {cfg.pairs.answers[0]!r}")
    prompt_rows = [[i, cl, co, a, w] for i, (cl, co, a, w) in enumerate(zip(
        cfg.pairs.clean, cfg.pairs.corrupted, cfg.pairs.answers, cfg.pairs.wrong_answers or [""] * len(cfg.pairs.clean),
        strict=True))]
    sections = [Section("model", f"Model card: {m.name}", "A pretrained model, loaded offline, and the prompts.",
                        [Table(["", "value"], [[k, v] for k, v in card.items()]),
                         Table(["pair", "clean", "corrupted", "answer", "wrong answer"], prompt_rows,
                               caption="Prompt pairs (pairs.*)")])]

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
    sections.append(_test_prompt_section(tp))
    ctx.data["logit_difference"] = logit_difference(model, pairs)

    specs = resolve_all(list(cfg.analyses))
    ctx.data["left_out"] = [{"analysis": s.name, "reason": s.pretrained} for s in specs if s.pretrained]
    sections += run_builders(ctx, [s for s in specs if not s.pretrained])
    ctx.data["highlights"] = pretrained_highlights(ctx.data)
    report = Report(title=f"toylens report: {m.name}", run_name=m.name, data=ctx.data, sections=sections,
                    ablation=ctx.ablation)
    index_figures(report)
    return report


def make_pretrained_report(cfg: AnalyzeConfig, model=None, hf_model=None) -> Path:
    """Build and write ``cfg.out`` (index.html, report.json, plotly.min.js) atomically; returns index.html.
    With ``strict=true`` an analysis that failed raises ``AnalysisFailed`` after the report is written."""
    from toylens.report.html import write_report

    report = build_pretrained_report(cfg, model, hf_model)
    index = write_report(report, Path(cfg.out))
    check_strict(cfg, report.data, index)
    return index
