"""In-context-learning task vectors (seed 000; Hendel et al. 2023) on the ``icl`` task:

    result = task_vectors(model, run.task, site="separator")

The two sites, baselines and the swap experiment: docs/analyses.md, "Task vectors"."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from toylens._compat import HookedTransformer
from toylens.analyze import plots
from toylens.data.tasks.icl import ICL
from toylens.model.unembed import Unembed
from toylens.result import Result
from toylens.runs.run import ANALYSIS_SEED

SITES = {"arrow": "final '->'", "separator": "last ';'"}


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
    return Unembed(model)(resid[:, pos])


def _visible(model: HookedTransformer, tokens: Tensor, pos: int) -> Tensor:
    """The positions ``pos`` can see: up to it under causal attention, all of them otherwise."""
    return tokens[:, :pos + 1] if model.cfg.attention_dir == "causal" else tokens


@torch.no_grad()
def resid_at(model: HookedTransformer, tokens: Int[Tensor, "batch pos"], pos: int | Int[Tensor, " batch"],
             points: list[str], read_pos: int | None = None, chunk_rows: int = 512,
             ) -> tuple[Float[Tensor, "point batch d_model"], Float[Tensor, "batch d_vocab"]]:
    """The residual stream at ``pos`` (one position, or one per row) at every point, and the
    (unpatched) logits at ``read_pos`` (``pos`` when None)."""
    read = int(pos) if read_pos is None else read_pos
    tokens, n_layers = _visible(model, tokens, read), model.cfg.n_layers
    at = torch.as_tensor(pos, device=tokens.device).expand(tokens.shape[0])
    grabbed, logits = [], []
    for lo in range(0, tokens.shape[0], chunk_rows):
        store: dict[str, Tensor] = {}
        rows = torch.arange(min(chunk_rows, tokens.shape[0] - lo), device=tokens.device)
        here = at[lo:lo + chunk_rows]
        hooks = [(p, lambda act, hook, s=store, r=rows, h=here: s.__setitem__(hook.name, act[r, h].clone()))
                 for p in points]
        with model.hooks(fwd_hooks=hooks):
            final = model(tokens[lo:lo + chunk_rows], stop_at_layer=n_layers)
        grabbed.append(torch.stack([store[p] for p in points]))
        logits.append(_logits_at(model, final, read))
    return torch.cat(grabbed, dim=1), torch.cat(logits)


@torch.no_grad()
def patched_logits(model: HookedTransformer, tokens: Int[Tensor, "batch pos"], pos: int,
                   vectors: Float[Tensor, "point variant *batch d_model"], points: list[str], *,
                   where: Bool[Tensor, "batch pos"] | None = None, chunk_rows: int = 512,
                   progress: bool = False) -> Float[Tensor, "point variant batch d_vocab"]:
    """Logits at ``pos`` with the residual stream at ``points[i]`` replaced by ``vectors[i, v]``, at
    ``pos`` or, with ``where``, at every position a row marks (each gets the same vector).

    ``vectors[i, v]`` is one ``[d_model]`` vector for every row, or ``[batch, d_model]`` (one per row).
    Positions after ``pos`` are never run when the model is causal; each point resumes from the cached
    residual stream.
    """
    tokens, n_layers = _visible(model, tokens, pos), model.cfg.n_layers
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
            marked = None if where is None else where[lo:hi, :tokens.shape[1]].to(tokens.device).repeat(n_var, 1)
            for i, point in enumerate(points):
                x = store[point].repeat(n_var, 1, 1)  # variant v: rows v * c .. (v + 1) * c
                v = vectors[i, :, lo:hi].reshape(-1, x.shape[-1]).to(x.dtype)
                if marked is None:
                    x[:, pos] = v
                else:
                    x = torch.where(marked[..., None], v[:, None], x)
                start = _start_layer(point, n_layers)
                if start < n_layers:
                    x = model(x, start_at_layer=start, stop_at_layer=n_layers)
                out[i, :, lo:hi] = _logits_at(model, x, pos).view(n_var, hi - lo, -1).float()
                bar.update(hi - lo)
    return out


@dataclass
class TaskVectorResult(Result):
    """Task-vector accuracies per residual-stream point (``hooks``) and rule (``ks``), at one ``site``.

    ``accuracy[point, k]``: zero-shot queries patched with ``theta_k`` answer ``task.answer(x, k)``;
    ``zero_shot_baseline[k]`` / ``demo_baseline[k]``: the same without a vector / with the demos.
    ``swap_follows_vector[point, k, k']`` / ``swap_follows_demos[...]``: demo prompts of rule ``k``
    patched with ``theta_k'`` that answer by ``k'`` / by ``k`` (NaN on the diagonal).
    ``vectors[point, k]``: the task vectors themselves (left out of ``to_dict``).
    """

    site: str
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
        return {"site": self.site, "hook": self.hooks[i], "index": i, "accuracy": float(self.accuracy_mean[i]),
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
        n, where = len(self.hooks), SITES[self.site]
        ticks = [h.replace("blocks.", "").replace(".hook_", " ") for h in self.hooks]
        lines = [self.accuracy_mean, self.zero_shot_baseline.mean().expand(n), self.demo_baseline.mean().expand(n)]
        labels = ["zero-shot + task vector", "zero-shot (no demos)", f"{self.n_demos} demos"]
        for j, k in enumerate(self.ks):
            lines.append(self.accuracy[:, j])
            labels.append(f"+ vector, rule k={k}")
        acc = plots.line(torch.stack(lines), labels=labels, title=f"Task vectors at the {where}: zero-shot accuracy",
                         xaxis="patched residual stream", yaxis="accuracy")
        swap = plots.line(torch.stack([_off_diagonal_mean(self.swap_follows_vector),
                                       _off_diagonal_mean(self.swap_follows_demos)]),
                          labels=["follows the vector's rule", "follows the demos' rule"],
                          title=f"Swapped task vectors at the {where} (demos of rule k, vector of rule k')",
                          xaxis="patched residual stream", yaxis="fraction of answers")
        for fig in (acc, swap):
            fig.update_xaxes(tickvals=list(range(n)), ticktext=ticks)
            fig.update_yaxes(range=[0, 1.02])
        i = self.best()["index"]
        names = [str(k) for k in self.ks]
        heat = plots.heatmap(self.swap_follows_vector[i], x_labels=names, y_labels=names, diverging=False,
                             zmin=0.0, zmax=1.0, xaxis="vector's rule k'", yaxis="demos' rule k",
                             title=f"Answers following the vector's rule at the {where}, {self.hooks[i]}")
        key = f"task_vectors/{self.site}"
        return {f"{key}/accuracy": acc, f"{key}/swap": swap, f"{key}/swap_best": heat}


def _off_diagonal_mean(x: Tensor) -> Tensor:
    """Mean over k != k' of ``[point, k, k']`` (NaN on the diagonal is skipped)."""
    return x.nanmean(dim=(1, 2)) if x.shape[1] > 1 else torch.full(x.shape[:1], float("nan"))


def _check(model: HookedTransformer, task, n: int, layers, site: str) -> list[str]:
    if not isinstance(task, ICL):
        raise TaskVectorError(f"task: task vectors need the 'icl' task, got {getattr(task, 'name', task)!r}; "
                              "train with task=icl")
    if site not in SITES:
        raise TaskVectorError(f"site={site!r}: choose one of {list(SITES)}")
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


def last_separator(task: ICL, tokens: Int[Tensor, "batch pos"]) -> Int[Tensor, " batch"]:
    """Each row's last ``;`` before the final ``->`` (the end of the last demo)."""
    before = task.separators(tokens)[:, :task.arrow_position()]
    return torch.where(before, torch.arange(before.shape[1], device=tokens.device), -1).amax(1)


@torch.no_grad()
def task_vectors(model: HookedTransformer, task: ICL, *, site: str = "arrow", n: int = 256,
                 seed: int = ANALYSIS_SEED, layers: list[int | str] | None = None, chunk_rows: int = 512,
                 progress: bool = True) -> TaskVectorResult:
    """Task vectors of every rule in ``task.ks`` at every residual-stream point (or ``layers``).

    ``site``: ``"arrow"`` (the final ``->``) or ``"separator"`` (the last ``;``; see the module
    docstring). ``n`` prompts per rule for the vectors (and the swap), ``n`` zero-shot queries; all
    drawn with ``seed`` on the CPU, so the result does not depend on the device. ``layers``: ints
    (``l``: block ``l``'s input, ``n_layers``: the last block's output) or hook names.
    """
    points = _check(model, task, n, layers, site)
    device, ks = model.cfg.device, list(task.ks)
    gen = torch.Generator().manual_seed(seed)
    arrow, arrow0 = task.arrow_position(), task.cfg.group_size + 2
    demos = [task.sample_rule(n, gen, k).tokens.to(device) for k in ks]
    q_group = task.query_group(task.sample_rule(n, gen, ks[0], n_demos=0).tokens).to(device)  # [n, g]
    queries = task.zero_shot(q_group)  # [BOS, ;, x_1..x_g, ->]: rule k answers task.answer(q_group, k)

    def marks(tokens: Tensor) -> Tensor | None:  # where a vector is written (None: the final arrow)
        before = torch.arange(tokens.shape[1], device=device) < arrow
        return None if site == "arrow" else task.separators(tokens) & before

    thetas, demo_acc = [], []
    for tokens in demos:
        src = arrow if site == "arrow" else last_separator(task, tokens)
        resid, logits = resid_at(model, tokens, src, points, read_pos=arrow, chunk_rows=chunk_rows)
        thetas.append(resid.mean(1))  # [point, d_model]
        demo_acc.append((logits.argmax(-1) == tokens[:, arrow + 1]).float().mean())
    theta = torch.stack(thetas, dim=1)  # [point, k, d_model]

    _, plain = resid_at(model, queries, arrow0, points[:1], chunk_rows=chunk_rows)
    zero_shot = torch.stack([(plain.argmax(-1) == task.answer(q_group, k)).float().mean() for k in ks])
    where0 = None if site == "arrow" else task.separators(queries)
    pred = patched_logits(model, queries, arrow0, theta, points, where=where0, chunk_rows=chunk_rows,
                          progress=progress).argmax(-1)  # [point, k, n]
    accuracy = torch.stack([(pred[:, j] == task.answer(q_group, k)).float().mean(-1) for j, k in enumerate(ks)], dim=1)

    nan = torch.full((len(points), len(ks), len(ks)), float("nan"))
    follows_vec, follows_demo = nan.clone(), nan.clone()
    for j, (k, tokens) in enumerate(zip(ks, demos, strict=True)):
        others = [i for i in range(len(ks)) if i != j]
        if not others:
            continue
        pred = patched_logits(model, tokens, arrow, theta[:, others], points, where=marks(tokens),
                              chunk_rows=chunk_rows, progress=progress).argmax(-1)  # [point, k', n]
        group = task.query_group(tokens)
        for v, i in enumerate(others):
            follows_vec[:, j, i] = (pred[:, v] == task.answer(group, ks[i])).float().mean(-1).cpu()
            follows_demo[:, j, i] = (pred[:, v] == task.answer(group, k)).float().mean(-1).cpu()

    return TaskVectorResult(
        site=site, hooks=points, ks=ks, accuracy=accuracy.cpu(), accuracy_mean=accuracy.mean(1).cpu(),
        zero_shot_baseline=zero_shot.cpu(), demo_baseline=torch.stack(demo_acc).cpu(),
        swap_follows_vector=follows_vec, swap_follows_demos=follows_demo, vectors=theta.cpu(), n=int(n),
        n_demos=task.cfg.n_demos, seed=int(seed))
