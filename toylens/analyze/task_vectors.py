"""In-context-learning task vectors (seed 000; Hendel et al. 2023) on the ``icl`` task.

    result = task_vectors(model, run.task)
    result.accuracy_mean      # [point]: zero-shot accuracy with the demos' vector patched in
    result.best()             # the residual-stream point that recovers the most, and its accuracy

For each rule ``k`` of the task, ``n`` demonstration prompts (``sample_rule`` with the config's
``n_demos``) give the task vector ``theta_k(point)``: the residual stream at the final ``->``
(``arrow_position``), mean over the prompts, at every point ``blocks.{l}.hook_resid_pre`` and the
last ``blocks.{L-1}.hook_resid_post``. Zero-shot queries ``[BOS, x_1..x_g, ->]`` get ``theta_k``
written over their own residual stream at their ``->``; the prediction there is right for rule
``k`` when it is ``task.answer(x, k)`` (``x_{k+1}``; ``x + k`` for ``rule: shift``). Baselines: the
same queries without a vector (no demos) and the demo prompts themselves (full demos). The swap
experiment patches ``theta_k'`` into demo prompts of rule ``k`` and counts the answers that follow
``k'`` (the vector) and those that follow ``k`` (the demos).

Reading the result: a model may solve ``icl`` without routing the rule through the ``->`` (e.g. by
marking the answer symbol at its own position, which the ``->`` then reads in the last layer); the
swap then follows the demos and recovery stays at the no-demo baseline, at every point. Also with
``rule: shift`` (the answer a function of the query symbol): a small model that copies the query
symbol into the ``->`` in block 0 and never reads it again loses it to any patch after block 0. With
learned absolute positions (``standard``) the vector also carries the demos' ``->`` position,
which is not the zero-shot ``->``'s; rotary models have no such confound.

Each patched run resumes from the cached residual stream at the patched point
(``forward(start_at_layer=l)``) with every rule's vector stacked along the batch, and unembeds
only the ``->``; ``patched_logits`` is checked against one ``run_with_hooks`` per point and vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from toylens._compat import HookedTransformer
from toylens.analyze import plots
from toylens.analyze.result import Result
from toylens.analyze.run import ANALYSIS_SEED
from toylens.data.tasks.icl import ICL


class TaskVectorError(ValueError):
    """Inputs task vectors cannot use; the message names the argument and the fix."""


def resid_points(model: HookedTransformer) -> list[str]:
    """Every residual-stream point: each block's input, then the last block's output."""
    n = model.cfg.n_layers
    return [f"blocks.{layer}.hook_resid_pre" for layer in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]


def _start_layer(point: str, n_layers: int) -> int:
    return n_layers if point.endswith("hook_resid_post") else int(point.split(".")[1])


def _logits_at(model: HookedTransformer, resid: Tensor, pos: int) -> Tensor:
    """Logits at one position from the residual stream after the last block (only that position)."""
    x = resid[:, pos:pos + 1]
    if model.cfg.normalization_type is not None:
        x = model.ln_final(x)
    logits = model.unembed(x)[:, 0]
    cap = model.cfg.output_logits_soft_cap
    return cap * torch.tanh(logits / cap) if cap > 0 else logits


@torch.no_grad()
def resid_at(model: HookedTransformer, tokens: Int[Tensor, "batch pos"], pos: int, points: list[str],
             chunk_rows: int = 512) -> tuple[Float[Tensor, "point batch d_model"], Float[Tensor, "batch d_vocab"]]:
    """The residual stream at ``pos`` at every point, and the logits there (unpatched)."""
    tokens, n_layers = tokens[:, :pos + 1], model.cfg.n_layers
    grabbed, logits = [], []
    for lo in range(0, tokens.shape[0], chunk_rows):
        store: dict[str, Tensor] = {}
        hooks = [(p, lambda act, hook, s=store: s.__setitem__(hook.name, act[:, pos].clone())) for p in points]
        with model.hooks(fwd_hooks=hooks):
            final = model(tokens[lo:lo + chunk_rows], stop_at_layer=n_layers)
        grabbed.append(torch.stack([store[p] for p in points]))
        logits.append(_logits_at(model, final, pos))
    return torch.cat(grabbed, dim=1), torch.cat(logits)


@torch.no_grad()
def patched_logits(model: HookedTransformer, tokens: Int[Tensor, "batch pos"], pos: int,
                   vectors: Float[Tensor, "point variant *batch d_model"], points: list[str], *,
                   chunk_rows: int = 512, progress: bool = False) -> Float[Tensor, "point variant batch d_vocab"]:
    """Logits at ``pos`` with the residual stream at ``(points[i], pos)`` replaced by ``vectors[i, v]``.

    ``vectors[i, v]`` is one ``[d_model]`` vector for every row, or ``[batch, d_model]`` (one per row).
    Positions after ``pos`` are never run (causal); each point resumes from the cached residual stream.
    """
    tokens, n_layers = tokens[:, :pos + 1], model.cfg.n_layers
    b, n_var = tokens.shape[0], vectors.shape[1]
    if vectors.ndim == 3:
        vectors = vectors[:, :, None].expand(-1, -1, b, -1)
    out = torch.empty(len(points), n_var, b, model.cfg.d_vocab_out, device=tokens.device)
    rows_per = max(1, chunk_rows // n_var)
    with tqdm(total=len(points) * b, disable=not progress, desc="task vectors", unit="row") as bar:
        for lo in range(0, b, rows_per):
            hi = min(b, lo + rows_per)
            store: dict[str, Tensor] = {}
            hooks = [(p, lambda act, hook, s=store: s.__setitem__(hook.name, act)) for p in points]
            with model.hooks(fwd_hooks=hooks):
                model(tokens[lo:hi], stop_at_layer=n_layers)
            for i, point in enumerate(points):
                x = store[point].repeat(n_var, 1, 1)  # variant v: rows v * c .. (v + 1) * c
                x[:, pos] = vectors[i, :, lo:hi].reshape(-1, x.shape[-1]).to(x.dtype)
                start = _start_layer(point, n_layers)
                if start < n_layers:
                    x = model(x, start_at_layer=start, stop_at_layer=n_layers)
                out[i, :, lo:hi] = _logits_at(model, x, pos).view(n_var, hi - lo, -1).float()
                bar.update(hi - lo)
    return out


@dataclass
class TaskVectorResult(Result):
    """Task-vector accuracies per residual-stream point (``hooks``) and rule (``ks``).

    ``accuracy[point, k]``: zero-shot queries patched with ``theta_k`` answer ``task.answer(x, k)``;
    ``zero_shot_baseline[k]`` / ``demo_baseline[k]``: the same without a vector / with the demos.
    ``swap_follows_vector[point, k, k']`` / ``swap_follows_demos[...]``: demo prompts of rule ``k``
    patched with ``theta_k'`` that answer by ``k'`` / by ``k`` (NaN on the diagonal).
    ``vectors[point, k]``: the task vectors themselves (left out of ``to_dict``).
    """

    hooks: list[str]
    ks: list[int]
    accuracy: Float[Tensor, "point k"]
    accuracy_mean: Float[Tensor, " point"]
    zero_shot_baseline: Float[Tensor, " k"]
    demo_baseline: Float[Tensor, " k"]
    swap_follows_vector: Float[Tensor, "point k k_vector"]
    swap_follows_demos: Float[Tensor, "point k k_vector"]
    vectors: Float[Tensor, "point k d_model"]
    n: int
    n_demos: int
    seed: int

    def best(self) -> dict:
        """The point with the highest mean patched accuracy, with both baselines (means over rules)."""
        i = int(self.accuracy_mean.argmax())
        return {"hook": self.hooks[i], "index": i, "accuracy": float(self.accuracy_mean[i]),
                "zero_shot_baseline": float(self.zero_shot_baseline.mean()),
                "demo_baseline": float(self.demo_baseline.mean()),
                "swap_follows_vector": float(_off_diagonal_mean(self.swap_follows_vector)[i]),
                "swap_follows_demos": float(_off_diagonal_mean(self.swap_follows_demos)[i])}

    def to_dict(self) -> dict:
        d = super().to_dict()
        del d["vectors"]
        d["swap_follows_vector_mean"] = _off_diagonal_mean(self.swap_follows_vector).tolist()
        d["swap_follows_demos_mean"] = _off_diagonal_mean(self.swap_follows_demos).tolist()
        d["best"] = self.best()
        return d

    def figures(self) -> dict:
        n = len(self.hooks)
        ticks = [h.replace("blocks.", "").replace(".hook_", " ") for h in self.hooks]
        lines = [self.accuracy_mean, self.zero_shot_baseline.mean().expand(n), self.demo_baseline.mean().expand(n)]
        labels = ["zero-shot + task vector", "zero-shot (no demos)", f"{self.n_demos} demos"]
        for j, k in enumerate(self.ks):
            lines.append(self.accuracy[:, j])
            labels.append(f"+ vector, rule k={k}")
        acc = plots.line(torch.stack(lines), labels=labels, title="Task vectors: zero-shot accuracy",
                         xaxis="patched residual stream", yaxis="accuracy")
        swap = plots.line(torch.stack([_off_diagonal_mean(self.swap_follows_vector),
                                       _off_diagonal_mean(self.swap_follows_demos)]),
                          labels=["follows the vector's rule", "follows the demos' rule"],
                          title="Swapped task vectors (demos of rule k, vector of rule k')",
                          xaxis="patched residual stream", yaxis="fraction of answers")
        for fig in (acc, swap):
            fig.update_xaxes(tickvals=list(range(n)), ticktext=ticks)
            fig.update_yaxes(range=[0, 1.02])
        i = self.best()["index"]
        names = [str(k) for k in self.ks]
        heat = plots.heatmap(self.swap_follows_vector[i], x_labels=names, y_labels=names, diverging=False,
                             zmin=0.0, zmax=1.0, xaxis="vector's rule k'", yaxis="demos' rule k",
                             title=f"Answers following the vector's rule at {self.hooks[i]}")
        return {"task_vectors/accuracy": acc, "task_vectors/swap": swap, "task_vectors/swap_best": heat}


def _off_diagonal_mean(x: Tensor) -> Tensor:
    """Mean over k != k' of ``[point, k, k']`` (NaN on the diagonal is skipped)."""
    return x.nanmean(dim=(1, 2)) if x.shape[1] > 1 else torch.full(x.shape[:1], float("nan"))


def _check(model: HookedTransformer, task, n: int, layers) -> list[str]:
    if not isinstance(task, ICL):
        raise TaskVectorError(f"task: task vectors need the 'icl' task, got {getattr(task, 'name', task)!r}; "
                              "train with task=icl")
    if task.cfg.n_demos < 1:
        raise TaskVectorError("task.n_demos: the demo prompts need at least one demo; set task.n_demos >= 1")
    if task.seq_len > model.cfg.n_ctx or task.d_vocab > model.cfg.d_vocab:
        raise TaskVectorError(f"model: n_ctx={model.cfg.n_ctx}, d_vocab={model.cfg.d_vocab} cannot hold the task "
                              f"(seq_len {task.seq_len}, d_vocab {task.d_vocab}); use the run's own task")
    if int(n) < 1:
        raise TaskVectorError(f"n={n}: must be at least 1 (prompts per rule)")
    points = resid_points(model)
    if layers is None:
        return points
    out = []
    for x in layers:
        if isinstance(x, str) and x in points:
            out.append(x)
        elif isinstance(x, int) and 0 <= x < len(points):
            out.append(points[x])
        else:
            raise TaskVectorError(f"layers: {x!r} is not a residual-stream point; use 0..{len(points) - 1} "
                                  f"(block l's input, {len(points) - 1}: the output) or one of {points}")
    return out


@torch.no_grad()
def task_vectors(model: HookedTransformer, task: ICL, *, n: int = 256, seed: int = ANALYSIS_SEED,
                 layers: list[int | str] | None = None, chunk_rows: int = 512,
                 progress: bool = True) -> TaskVectorResult:
    """Task vectors of every rule in ``task.ks`` at every residual-stream point (or ``layers``).

    ``n`` prompts per rule for the vectors (and the swap), ``n`` zero-shot queries; all drawn with
    ``seed`` on the CPU, so the result does not depend on the device. ``layers``: ints (``l``: block
    ``l``'s input, ``n_layers``: the last block's output) or hook names.
    """
    points = _check(model, task, n, layers)
    device, g, ks = model.cfg.device, task.cfg.group_size, list(task.ks)
    gen = torch.Generator().manual_seed(seed)
    arrow, arrow0 = task.arrow_position(), task.arrow_position(0)
    demos = [task.sample_rule(n, gen, k).tokens.to(device) for k in ks]
    queries = task.sample_rule(n, gen, ks[0], n_demos=0).tokens.to(device)
    q_group = queries[:, 1:g + 1]  # [n, g]: the query's symbols; rule k answers task.answer(q_group, k)

    thetas, demo_acc = [], []
    for tokens in demos:
        resid, logits = resid_at(model, tokens, arrow, points, chunk_rows)
        thetas.append(resid.mean(1))  # [point, d_model]
        demo_acc.append((logits.argmax(-1) == tokens[:, arrow + 1]).float().mean())
    theta = torch.stack(thetas, dim=1)  # [point, k, d_model]

    _, plain = resid_at(model, queries, arrow0, points[:1], chunk_rows)
    zero_shot = torch.stack([(plain.argmax(-1) == task.answer(q_group, k)).float().mean() for k in ks])
    pred = patched_logits(model, queries, arrow0, theta, points, chunk_rows=chunk_rows,
                          progress=progress).argmax(-1)  # [point, k, n]
    accuracy = torch.stack([(pred[:, j] == task.answer(q_group, k)).float().mean(-1) for j, k in enumerate(ks)], dim=1)

    nan = torch.full((len(points), len(ks), len(ks)), float("nan"))
    follows_vec, follows_demo = nan.clone(), nan.clone()
    for j, (k, tokens) in enumerate(zip(ks, demos, strict=True)):
        others = [i for i in range(len(ks)) if i != j]
        if not others:
            continue
        pred = patched_logits(model, tokens, arrow, theta[:, others], points, chunk_rows=chunk_rows,
                              progress=progress).argmax(-1)  # [point, k', n]
        group = tokens[:, arrow - g:arrow]
        for v, i in enumerate(others):
            follows_vec[:, j, i] = (pred[:, v] == task.answer(group, ks[i])).float().mean(-1).cpu()
            follows_demo[:, j, i] = (pred[:, v] == task.answer(group, k)).float().mean(-1).cpu()

    return TaskVectorResult(
        hooks=points, ks=ks, accuracy=accuracy.cpu(), accuracy_mean=accuracy.mean(1).cpu(),
        zero_shot_baseline=zero_shot.cpu(), demo_baseline=torch.stack(demo_acc).cpu(),
        swap_follows_vector=follows_vec, swap_follows_demos=follows_demo, vectors=theta.cpu(), n=int(n),
        n_demos=task.cfg.n_demos, seed=int(seed))
