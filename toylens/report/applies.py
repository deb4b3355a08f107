"""Which report sections apply to a model, and the section that stands in for an analysis that failed.

An analysis that cannot apply (MLP neurons of an attention-only model, task vectors of a non-icl
run, patching without clean/corrupted pairs) is left out with a one-line reason; one that fails is
shown with its error, so the rest of the report is still written (``strict=true`` turns it into exit 1).
"""

from __future__ import annotations

from toylens.report.page import Note, Section

TITLES = {"overview": "Model card", "training": "Training curves", "fold": "LayerNorm folding check",
          "attention": "Attention patterns and head scores", "circuits": "QK and OV circuits",
          "dla": "Direct logit attribution", "logit_lens": "Logit lens", "neurons": "MLP neurons",
          "ablation": "Ablating every hook", "patching": "Activation patching", "tracing": "Causal tracing",
          "task_vectors": "Task vectors (in-context rules)", "dynamics": "Training dynamics",
          "induction": "Induction heads", "fourier": "Grokking: modular addition in the Fourier basis",
          "equivalence": "Hugging Face vs TransformerLens", "test_prompt": "The first prompt"}
SECTION_IDS = {"overview": "model"}  # builder name -> section id, where they differ


def left_out_reason(name: str, ctx) -> str | None:
    """Why analysis ``name`` does not apply to ``ctx``'s model or run (one line), or None when it does."""
    cfg = ctx.model.cfg
    task = None if ctx.run is None else ctx.run.task
    if name in ("induction", "fourier"):
        from toylens.report.canon import left_out

        return left_out(name, ctx)
    if name == "neurons" and cfg.attn_only:
        return "the model is attention-only: it has no MLP neurons"
    if name == "task_vectors" and (task is None or task.name != "icl"):
        what = "a pretrained model" if task is None else f"a run of the {task.name} task"
        return (f"task vectors need a run of the icl task (e.g. toylens-train experiment=icl_task_vectors); "
                f"this is {what}")
    if name == "discovery":
        from toylens.model.eligibility import fast_path_reason

        why = fast_path_reason(ctx.model)
        if why:
            return f"circuit discovery runs on the fused engine, which does not compute this model ({why})"
    if name in ("patching", "tracing", "discovery"):
        from toylens.report.interventions import pairs_for

        pairs = pairs_for(ctx)
        if isinstance(pairs, str):
            return pairs
    return None


def error_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or "(no message)"
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}"


def failed_section(ctx, name: str, e: BaseException) -> Section:
    """The section of an analysis that raised: its error, recorded in report.json as well."""
    line = error_line(e)
    sid = SECTION_IDS.get(name, name)
    ctx.data[sid] = {"error": line}
    ctx.data.setdefault("errors", []).append({"analysis": name, "error": line})
    return Section(sid, TITLES.get(name, name), "This analysis failed; the other sections are unaffected.",
                   [Note(f"FAILED: {line}", "fail")])
