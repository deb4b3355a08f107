"""The report's "At a glance" box: did the model learn its task, and the headline that belongs to
the task (the previous-token head for prev_token, the induction head and its partner for repeated
sequences, key frequencies for modular_add); nothing task-specific for a task it does not belong to."""

from __future__ import annotations

REPEAT_TASKS = ("induction",)  # tasks whose answer is a repeat of an earlier segment


def _num(v) -> str:
    return "—" if v is None else f"{v:.4g}"


def _layer(head: str) -> int:
    return int(head[1:].split("H")[0])


def _best(scores: dict, name: str, layers: set[int] | None = None) -> tuple[str, float] | None:
    """The head with the highest ``name`` score (optionally only in ``layers``)."""
    cand = [(v[name], h) for h, v in scores.items()
            if v.get(name) is not None and v[name] == v[name] and (layers is None or _layer(h) in layers)]
    if not cand:
        return None
    score, head = max(cand)
    return head, score


def _shortcut(attn: dict, head: str) -> str:
    s = attn.get("positional_shortcuts", {}).get(head)
    if not s or s["offset"] < 2:
        return ""
    return (f"; positional shortcut: {s['share']:.2f} of its attention goes {s['offset']} tokens back even with "
            f"the tokens shuffled, so the score reflects the layout, not token content")


def task_headline(data: dict) -> list[list]:
    """Rows [label, text] of the task's own headline, from the sections that ran."""
    task = data.get("run", {}).get("task", {}).get("name")
    attn = data.get("attention", {})
    scores = attn.get("scores_by_head", {})
    rows: list[list] = []
    if task == "prev_token" and scores:
        head, score = _best(scores, "previous_token")
        rows.append(["previous-token head", f"{head} (previous_token score {score:.3f}){_shortcut(attn, head)}"])
    elif task in REPEAT_TASKS and (data.get("induction") or {}).get("circuit", {}).get("found"):
        c = data["induction"]["circuit"]  # the induction section's own finding (repeated random segments)
        rows.append(["induction head and partner", f"{c['line']}{_shortcut(attn, c['induction_head'])}"])
    elif task in REPEAT_TASKS and scores:
        n_layers = data.get("model_card", {}).get("n_layers", 1)
        later = set(range(1, n_layers)) if n_layers > 1 else None
        ind = _best(scores, "induction", later)
        if ind is not None:
            head, score = ind
            layer = _layer(head)
            rows.append(["induction head", f"{head} (induction score {score:.3f}){_shortcut(attn, head)}"])
            partner = _best(scores, "previous_token", set(range(layer))) if layer > 0 else None
            if partner is not None:
                rows.append(["its partner (previous-token head in an earlier layer)",
                             f"{partner[0]} (previous_token score {partner[1]:.3f})"])
    elif task == "modular_add":
        f = data.get("fourier") or {}
        freqs = f.get("key_freqs") or f.get("key_frequencies")
        if freqs:
            share = f" ({f['key_share']:.1%} of the embedding's squared norm)" if "key_share" in f else ""
            rows.append(["key frequencies", ", ".join(str(k) for k in freqs) + share])
    return rows


def highlights(ctx) -> dict:
    """The headline numbers of the report (shown in the box at the top of the page): ``rows`` for the
    page, and the same values by name for report.json readers."""
    data = ctx.data if hasattr(ctx, "data") else ctx
    h: dict = {"rows": []}
    rows = h["rows"]
    learned = data.get("learned")
    if learned:
        h["learned"] = learned["verdict"]
        rows.append(["learned the task?", learned["text"]])
    card = data.get("model_card", {})
    h["positional_embedding_type"] = card.get("positional_embedding_type")
    h["w_pos_norm"] = card.get("w_pos_norm")
    if card.get("positional_setting"):
        rows.append(["positions", card["positional_setting"]])
    for k in ("eval/loss", "eval/accuracy"):
        if k in card.get("final_metrics", {}):
            h[f"final {k}"] = card["final_metrics"][k]
            rows.append([f"final {k}", card["final_metrics"][k]])
    fold = data.get("fold")
    if fold and "error" not in fold:
        h["fold passed"] = fold.get("passed")
        rows.append(["fold check", f"{'PASS' if fold.get('passed') else 'FAIL'}: max |Δ log-prob| "
                                   f"{_num(fold.get('max_abs_logprob_diff'))}"])
    task_rows = task_headline(data)
    if task_rows and learned and learned["kind"] == "fail":
        task_rows = [[k, f"{v} — but the model did not learn the task, so this is not a circuit yet"]
                     for k, v in task_rows]
    h["task_headline"] = task_rows
    rows += task_rows
    attn = data.get("attention", {})
    if "previous_token_head" in attn:
        h["previous_token_head"] = attn["previous_token_head"]
    abl = data.get("ablation", {})
    if "rows" in abl:
        h["clean loss"] = abl["clean_loss"]
        h["top ablations"] = [{"hook": r["hook"], "mode": r["mode"], "loss": r["loss"],
                               "delta_loss": r["delta_loss"]} for r in abl["rows"][:5]]
        for i, r in enumerate(h["top ablations"][:3], 1):
            rows.append([f"ablation #{i}", f"{r['hook']} ({r['mode']}): loss {_num(r['loss'])}, "
                                           f"Δ {_num(r['delta_loss'])}"])
    for e in data.get("errors", []):
        rows.append([f"{e['analysis']} failed", e["error"]])
    return h
