"""The report's first two sections: the model card (architecture, positional setting, whether the
model learned its task against the task's chance level) and the training curves."""

from __future__ import annotations

import plotly.graph_objects as go
import torch

from toylens.model.build import positional_embedding_type
from toylens.report.config import config_dict
from toylens.report.page import Figure, Note, Section, Table
from toylens.result import jsonable

TRAIN_CURVES = ("train/loss", "eval/loss", "eval/accuracy")
LEARNED = 0.99  # held-out accuracy at which the task counts as learned
NEAR_CHANCE = 0.1  # within this fraction of the way from chance to 1: not learned


def _style(fig: go.Figure, height: int = 400) -> go.Figure:
    fig.update_layout(height=height, margin=dict(l=60, r=20, t=56, b=50), title_font_size=14, title_x=0.02)
    return fig


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def positional_statement(model) -> str:
    """One sentence on how the model gets position information, with W_pos's norm where it has one."""
    pos = positional_embedding_type(model)
    if pos == "none":
        norm = float(model.W_pos.detach().norm())
        ok = "as it must" if norm == 0 else "it should be 0: the no-position setting is broken"
        return (f"Positional embedding 'none': the model gets no position information from its embedding; "
                f"W_pos is frozen at zero (norm {norm:.4g}, {ok}). Order can only come from causal attention.")
    if pos == "standard":
        return (f"Positional embedding 'standard': a learned absolute embedding W_pos (norm "
                f"{float(model.W_pos.detach().norm()):.4g}) is added to each token's embedding.")
    if pos == "rotary":
        return ("Positional embedding 'rotary': queries and keys are rotated by position (RoPE), so attention "
                "sees relative positions; there is no W_pos.")
    return f"Positional embedding {pos!r} (TransformerLens's setting)."


@torch.no_grad()
def learned_status(model, task, batch, final_accuracy: float | None, chunk_size: int = 250) -> dict:
    """Held-out accuracy against the task's chance level: the task's own accuracy metric of a predictor
    that outputs, at every position, the most frequent target there (it knows the layout, not the tokens)."""
    tokens, targets, mask = batch.tokens, batch.targets, batch.loss_mask
    d_vocab = model.cfg.d_vocab
    counts = torch.zeros(tokens.shape[1], d_vocab, device=tokens.device)
    counts.scatter_add_(1, targets.clamp(0, d_vocab - 1).T, mask.T.float())
    majority = counts.argmax(-1)  # [pos]
    base = torch.nn.functional.one_hot(majority, d_vocab).float()[None].expand(tokens.shape[0], -1, -1)
    chance = float(task.accuracy(base, batch))
    acc = []
    for i in range(0, tokens.shape[0], chunk_size):
        part = batch[i:i + chunk_size]
        acc.append(float(task.accuracy(model(part.tokens), part)) * part.tokens.shape[0])
    batch_acc = sum(acc) / tokens.shape[0]
    accuracy = final_accuracy if final_accuracy is not None else batch_acc
    source = "final eval/accuracy" if final_accuracy is not None else "accuracy on the analysis batch"
    if accuracy >= LEARNED:
        verdict, kind = "learned the task", "pass"
    elif accuracy <= chance + NEAR_CHANCE * (1 - chance):
        verdict, kind = "did not learn the task (accuracy at chance)", "fail"
    else:
        verdict, kind = "partly learned the task", "warn"
    text = (f"The model {verdict}: {source} {accuracy:.4g} against chance {chance:.4g} (the task's accuracy of "
            f"always predicting each position's most frequent answer); learned means ≥ {LEARNED}.")
    return {"verdict": verdict, "kind": kind, "accuracy": accuracy, "accuracy_source": source,
            "batch_accuracy": batch_acc, "chance": chance, "learned_at": LEARNED, "text": text}


def overview(ctx) -> Section:
    run, model, cfg = ctx.run, ctx.model, ctx.model.cfg
    params = list(model.parameters())
    pos = positional_embedding_type(model)
    w_pos = float(model.W_pos.detach().norm()) if cfg.positional_embedding_type == "standard" else None
    final = {}
    for row in run.metrics:
        final.update({k: v for k, v in row.items() if k != "step"})
    statement = positional_statement(model)
    card = {
        "n_params": sum(p.numel() for p in params),
        "n_trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "positional_embedding_type": pos, "w_pos_norm": w_pos,
        "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "d_model": cfg.d_model, "d_head": cfg.d_head,
        "d_mlp": None if cfg.attn_only else cfg.d_mlp, "d_vocab": cfg.d_vocab, "n_ctx": cfg.n_ctx,
        "act_fn": None if cfg.attn_only else cfg.act_fn, "normalization_type": cfg.normalization_type,
        "attn_only": cfg.attn_only, "final_metrics": final, "positional_setting": statement,
    }
    acc = final.get("eval/accuracy")
    status = learned_status(model, run.task, ctx.batch, acc if isinstance(acc, (int, float)) else None,
                            ctx.cfg.chunk_size)
    ctx.data["run"] = {"name": run.name, "path": str(run.path), "experiment": run.config.name,
                       "step": ctx.step, "steps": run.steps, "task": run.task.describe(),
                       "wandb": run.config.logger.name == "wandb"}
    ctx.data["settings"] = config_dict(ctx.cfg)
    ctx.data["model_card"] = jsonable(card)
    ctx.data["learned"] = jsonable(status)
    ctx.data["config"] = jsonable(_flatten(run.config.to_dict()))
    summary = [[k, v] for k, v in ctx.data["model_card"].items() if k not in ("final_metrics", "positional_setting")]
    summary += [[f"final {k}", v] for k, v in final.items()]
    summary += [["chance accuracy", status["chance"]]]
    return Section("model", "Model card", (
        "What was trained: the architecture, the task and the full training config, and whether the model "
        "learned the task."), [
        Note(status["text"], status["kind"]), Note(statement, "info"),
        Table(["property", "value"], summary, caption=f"Checkpoint step {ctx.step} of {run.steps}"),
        Table(["config key", "value"], [[k, v] for k, v in ctx.data["config"].items()],
              caption="Training config (.hydra/config.yaml)")])


def training(ctx) -> Section:
    series = {}
    for key in TRAIN_CURVES:
        pts = [(r["step"], r[key]) for r in ctx.run.metrics if isinstance(r.get(key), (int, float))]
        if pts:
            series[key] = {"step": [p[0] for p in pts], "value": [p[1] for p in pts]}
    ctx.data["training"] = jsonable(series)
    section = Section("training", "Training curves", (
        "Loss (log scale) and accuracy against the training step, from metrics.jsonl. train/loss is "
        "averaged over the steps since the last log line; eval/* are measured on a fixed held-out batch."))
    losses = [k for k in ("train/loss", "eval/loss") if k in series]
    if losses:
        fig = go.Figure([go.Scatter(x=series[k]["step"], y=series[k]["value"], mode="lines", name=k)
                         for k in losses])
        positive = all(v > 0 for k in losses for v in series[k]["value"])
        fig.update_layout(title="Loss", xaxis_title="step", yaxis_title="loss")
        if positive:
            fig.update_yaxes(type="log")
        section.blocks.append(Figure("training/loss", _style(fig)))
    if "eval/accuracy" in series:
        s = series["eval/accuracy"]
        fig = go.Figure(go.Scatter(x=s["step"], y=s["value"], mode="lines+markers", name="eval/accuracy"))
        fig.update_layout(title="Held-out accuracy", xaxis_title="step", yaxis_title="eval/accuracy")
        section.blocks.append(Figure("training/accuracy", _style(fig)))
    if not series:
        section.blocks.append(Note("metrics.jsonl has no train/loss, eval/loss or eval/accuracy rows.", "warn"))
    return section
