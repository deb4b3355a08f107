"""Induction heads (Elhage et al. 2021; Olsson et al. 2022): head scores on repeated random segments, OV copying,
K-composition from earlier heads, the in-context-learning score and per-position loss. Definitions:
docs/analyses.md, "Induction heads"."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from toylens._compat import FactoredMatrix, HookedTransformer
from toylens.analyze import plots
from toylens.analyze.attention import head_score_sums, score_masks
from toylens.result import Result

INDUCTION_SCORES = ("previous_token", "induction", "prefix_matching")


@dataclass(frozen=True)
class RepeatSpec:
    """How to build analysis sequences for a task: symbols ``low..high-1``, an optional BOS, half length L."""

    half_len: int
    low: int
    high: int
    bos: int | None = None

    @property
    def start(self) -> int:  # position of x_1
        return 0 if self.bos is None else 1

    @property
    def seq_len(self) -> int:
        return self.start + 2 * self.half_len


def repeat_spec(task, n_ctx: int | None = None) -> tuple[RepeatSpec | None, str]:
    """(spec, "") for a task whose sequences repeat a random segment, else (None, the reason).

    The analysis segment has the task's length L, except with the task's fixed layout ``[BOS, x, x]``:
    there a head can find the induction key by position alone (always L - 1 back), so the analysis
    uses ``L - max(1, L // 4)`` and only a head that matches content scores on the repeat.
    """
    cfg = task.cfg
    if "induction" not in task.name or not hasattr(cfg, "n_symbols"):
        return None, (f"task {task.name!r} has no repeated random segments (induction scores need an "
                      f"induction task, e.g. experiment=induction_heads)")
    bos = getattr(task, "BOS", None)
    half = getattr(cfg, "half_len", None) or (task.seq_len - (bos is not None)) // 2
    if getattr(cfg, "layout", "fixed") == "fixed" and half > 2:
        half -= max(1, half // 4)
    n_ctx = task.seq_len if n_ctx is None else min(n_ctx, task.seq_len)
    half = min(half, (n_ctx - (bos is not None)) // 2)
    low = 1 if bos == 0 else 0
    return RepeatSpec(half_len=half, low=low, high=low + cfg.n_symbols, bos=bos), ""


def repeated_tokens(spec: RepeatSpec, n_rows: int, seed: int) -> Int[Tensor, "batch pos"]:
    """``n_rows`` sequences ``[BOS?, x, x]`` with ``x`` uniform over the symbols (CPU, seeded)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(spec.low, spec.high, (n_rows, spec.half_len), generator=gen)
    parts = [x, x] if spec.bos is None else [torch.full((n_rows, 1), spec.bos), x, x]
    return torch.cat(parts, dim=1)


def induction_masks(tokens: Int[Tensor, "batch pos"], spec: RepeatSpec) -> dict[str, Tensor]:
    """The ``[batch, query_pos, key_pos]`` masks of ``INDUCTION_SCORES`` (see the module docstring)."""
    b, n = tokens.shape
    base = score_masks(tokens)
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    repeat = (q >= spec.start + spec.half_len) & (k == q - spec.half_len + 1)
    return {"previous_token": base["previous_token"], "induction": repeat[None].expand(b, n, n),
            "prefix_matching": base["induction"]}


def positive_eigenvalue_fraction(full_ov: FactoredMatrix) -> Float[Tensor, "*heads"]:
    """sum(max(Re λ, 0)) / sum(|λ|) of each matrix (from the small factor: same nonzero eigenvalues)."""
    eig = full_ov.eigenvalues
    return eig.real.clamp(min=0).sum(-1) / eig.abs().sum(-1).clamp(min=1e-30)


def icl_positions(n_predicted: int) -> tuple[int, int]:
    """(early, late) indices into the per-position loss: Olsson's 50th and 500th of 512 tokens, scaled."""
    early = max(0, min(n_predicted - 1, round(n_predicted * 50 / 512)))
    late = max(0, min(n_predicted - 1, round(n_predicted * 500 / 512)))
    return early, late


@dataclass
class InductionResult(Result):
    """Scores per head (``[layer, head_index]``), composition ``[layer, head_index, layer, head_index]``,
    per-position loss (``loss_by_pos[t]``: predicting token ``t + 1`` from position ``t``) and the circuit."""

    head_labels: list[str]
    scores: dict[str, Float[Tensor, "layer head_index"]]
    copying: Float[Tensor, "layer head_index"]
    copying_signed: Float[Tensor, "layer head_index"]
    composition: dict[str, Float[Tensor, "layer head_index layer head_index"]]
    loss_by_pos: Float[Tensor, " pos"]
    half_len: int
    start: int
    n_rows: int
    icl_early_pos: int = 0
    icl_late_pos: int = 0
    circuit: dict = field(default_factory=dict)
    task_scores: dict[str, Tensor] | None = None  # previous_token / induction on the task's own batch
    task_carriers: dict = field(default_factory=dict)  # {"previous_token": [...], "induction": [...]}, same rule

    @property
    def icl_score(self) -> float:
        return float(self.loss_by_pos[self.icl_late_pos] - self.loss_by_pos[self.icl_early_pos])

    @property
    def repeated_half_loss(self) -> float:
        """Mean loss predicting the repeat's tokens x_2..x_L (from positions start+L .. start+2L-2)."""
        s, L = self.start, self.half_len
        return float(self.loss_by_pos[s + L:s + 2 * L - 1].mean())

    @property
    def first_half_loss(self) -> float:
        """Mean loss predicting x_2..x_L in the first half (random: ≈ log of the number of symbols)."""
        s, L = self.start, self.half_len
        return float(self.loss_by_pos[s:s + L - 1].mean())

    def to_dict(self) -> dict:
        d = super().to_dict()
        flat = {n: s.reshape(-1) for n, s in self.scores.items()}
        d["scores_by_head"] = {h: {**{n: float(s[i]) for n, s in flat.items()},
                                   "copying": float(self.copying.reshape(-1)[i]),
                                   "copying_signed": float(self.copying_signed.reshape(-1)[i])}
                               for i, h in enumerate(self.head_labels)}
        if self.task_scores is not None:
            d["task_scores_by_head"] = {h: {n: float(s.reshape(-1)[i]) for n, s in self.task_scores.items()}
                                        for i, h in enumerate(self.head_labels)}
        d.update(icl_score=self.icl_score, repeated_half_loss=self.repeated_half_loss,
                 first_half_loss=self.first_half_loss)
        return d

    def figures(self) -> dict:
        figs = {}
        names = [*INDUCTION_SCORES, "copying"]
        table = torch.stack([*(self.scores[n].reshape(-1) for n in INDUCTION_SCORES), self.copying.reshape(-1)])
        figs["induction/head_scores"] = plots.heatmap(
            table, x_labels=self.head_labels, y_labels=names, diverging=False, zmin=0.0, zmax=1.0,
            title="Head scores on repeated random segments (copying: OV eigenvalues)", xaxis="head", yaxis="score")
        n_layers, n_heads = self.copying.shape
        if n_layers >= 2:
            k = self.composition["K"]
            figs["induction/k_composition"] = plots.heatmap(
                k[0, :, 1, :].T, x_labels=self.head_labels[:n_heads], y_labels=self.head_labels[n_heads:2 * n_heads],
                diverging=False, zmin=0.0, title="K-composition: layer-0 head (column) into layer-1 head (row)",
                xaxis="layer-0 head (writes)", yaxis="layer-1 head (reads as key)")
        s, L = self.start, self.half_len
        pos = list(range(len(self.loss_by_pos)))
        fig = go.Figure(go.Scatter(x=pos, y=self.loss_by_pos.tolist(), mode="lines+markers", name="loss"))
        fig.add_vrect(x0=s + L - 0.5, x1=s + 2 * L - 1.5, fillcolor="green", opacity=0.08, line_width=0,
                      annotation_text="repeated half", annotation_position="top left")
        for p, name in ((self.icl_early_pos, "early"), (self.icl_late_pos, "late")):
            fig.add_vline(x=p, line_dash="dot", annotation_text=f"ICL {name}")
        fig.update_layout(title=f"Loss per position on [BOS, x, x] (ICL score {self.icl_score:+.3f})",
                          xaxis_title="position predicting the next token", yaxis_title="loss (nats)")
        figs["induction/loss_by_pos"] = fig
        return figs


# A function is carried by every head scoring at least CARRIER_SHARE of the best head's score and at least
# CARRIER_MIN absolute: a previous-token attention split 0.45 / 0.51 over two heads names both, never just the top.
CARRIER_SHARE, CARRIER_MIN = 0.5, 0.2
CARRIER_RULE = (f"a head carries a function when its score is ≥ {CARRIER_SHARE:g} × the best head's and ≥ "
                f"{CARRIER_MIN:g}")


def carriers(head_labels: list[str], score: Tensor, layers: range) -> list[dict]:
    """Heads of ``layers`` carrying the score ``[layer, head_index]`` by ``CARRIER_RULE``, best first; the best
    head alone (``"weak": True``) when none reaches ``CARRIER_MIN``."""
    n_heads = score.shape[1]
    cand = [(float(score[lay, h]), lay * n_heads + h) for lay in layers for h in range(n_heads)
            if math.isfinite(float(score[lay, h]))]
    if not cand:
        return []
    cand.sort(key=lambda c: -c[0])
    top = cand[0][0]
    chosen = [c for c in cand if c[0] >= CARRIER_SHARE * top and c[0] >= CARRIER_MIN]
    if not chosen:
        return [{"head": head_labels[cand[0][1]], "score": top, "weak": True}]
    return [{"head": head_labels[i], "score": v} for v, i in chosen]


def _heads_text(heads: list[dict], what: str, split: str) -> str:
    if len(heads) == 1:
        return f"{heads[0]['head']} ({what} {heads[0]['score']:.2f})"
    return f"{split} split: " + ", ".join(f"{h['head']} {h['score']:.2f}" for h in heads)


def name_circuit(head_labels: list[str], scores: dict[str, Tensor], composition: Tensor | dict[str, Tensor]) -> dict:
    """The circuit: every previous-token head and every induction head (``carriers``; layer >= 1 for induction,
    earlier layers for previous-token), the Q/K/V composition of each (previous-token head, induction head) pair,
    and the one-line name naming all of them ("split" where several heads share a function). Also the top
    induction head and its K-composition partner (the earlier head composing most into it), as before.
    ``composition``: ``{"K", "Q", "V"}`` scores ``[layer, head_index, layer, head_index]`` (a tensor: K only)."""
    comps = composition if isinstance(composition, dict) else {"K": composition}
    kc = comps["K"]
    n_layers, n_heads = scores["induction"].shape
    if n_layers < 2:
        return {"line": "one layer: no head can compose with an earlier one, so no induction circuit",
                "found": False}
    ind = torch.nan_to_num(scores["induction"].clone(), nan=-1.0)
    ind[0] = -math.inf
    flat = int(ind.reshape(-1).argmax())
    il, ih = divmod(flat, n_heads)
    comp = kc[:il, :, il, ih]  # every earlier head into the induction head
    pflat = int(comp.reshape(-1).argmax())
    pl, ph = divmod(pflat, n_heads)
    prev = torch.nan_to_num(scores["previous_token"][:il].clone(), nan=-1.0)
    best_prev = int(prev.reshape(-1).argmax())
    pair = kc[:il, :, il:, :]  # earlier -> this and later layers, for a baseline
    out = {
        "induction_head": head_labels[flat], "induction_score": float(scores["induction"][il, ih]),
        "partner_head": head_labels[pflat], "k_composition": float(comp[pl, ph]),
        "partner_previous_token_score": float(scores["previous_token"][pl, ph]),
        "best_previous_token_head": head_labels[best_prev],
        "mean_k_composition_into_later_layers": float(pair[pair != 0].mean()) if bool((pair != 0).any()) else 0.0,
    }
    out["partner_is_previous_token_head"] = out["partner_head"] == out["best_previous_token_head"]
    ind_heads = carriers(head_labels, scores["induction"], range(1, n_layers))
    last = max(int(h["head"][1:].split("H")[0]) for h in ind_heads)
    prev_heads = carriers(head_labels, scores["previous_token"], range(last))
    out.update(rule=CARRIER_RULE, previous_token_heads=prev_heads, induction_heads=ind_heads,
               previous_token_split=len(prev_heads) > 1, induction_split=len(ind_heads) > 1)

    def at(name: str) -> tuple[int, int]:
        return divmod(head_labels.index(name), n_heads)

    pairs = []
    for p in prev_heads:
        for q in ind_heads:
            (a, b), (c, d) = at(p["head"]), at(q["head"])
            if a < c:
                pairs.append({"src": p["head"], "dst": q["head"],
                              **{m: float(comps[m][a, b, c, d]) for m in ("K", "Q", "V") if m in comps}})
    out["pairs"] = pairs
    prev_t = _heads_text(prev_heads, "previous token", "previous-token attention")
    ind_t = _heads_text(ind_heads, "induction", "induction")
    if len(pairs) == 1:
        out["line"] = f"{prev_t} → K-composition {pairs[0]['K']:.2f} → {ind_t}"
    else:
        modes = [m for m in ("K", "Q", "V") if m in comps]
        out["line"] = (f"{prev_t} → {ind_t}; composition {'/'.join(modes)}: " + ", ".join(
            f"{e['src']}→{e['dst']} " + "/".join(f"{e[m]:.2f}" for m in modes) for e in pairs))
    out["found"] = True
    return out


@torch.no_grad()
def task_batch_scores(model: HookedTransformer, tokens: Int[Tensor, "batch pos"], loss_mask: Tensor,
                      chunk_size: int = 250) -> dict[str, Tensor]:
    """``previous_token`` and ``induction`` scores ``[layer, head_index]`` on the task's own batch: previous-token
    over every query, induction (attention to the token after an earlier copy of the query's token) over the
    queries the loss is scored at (``loss_mask``), where the task's answer is that token."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    names = ("previous_token", "induction")
    sums = {n: torch.zeros(n_layers, n_heads) for n in names}
    counts = {n: torch.zeros(n_layers) for n in names}
    for start in range(0, len(tokens), chunk_size):
        rows = tokens[start:start + chunk_size].to(model.cfg.device)
        base = score_masks(rows)
        masks = {"previous_token": base["previous_token"],
                 "induction": base["induction"] & loss_mask[start:start + chunk_size, :, None].to(rows.device)}

        def hook(pattern, hook, rows=rows, masks=masks):
            for name, (s, c) in head_score_sums(pattern.float(), rows, masks).items():
                sums[name][hook.layer()] += s.cpu()
                counts[name][hook.layer()] += c.cpu()

        model.run_with_hooks(rows, fwd_hooks=[(f"blocks.{i}.attn.hook_pattern", hook) for i in range(n_layers)])
    return {n: torch.where(counts[n][:, None] > 0, sums[n] / counts[n][:, None].clamp(min=1),
                           torch.full_like(sums[n], math.nan)) for n in names}


@torch.no_grad()
def repeat_scores(model: HookedTransformer, tokens: Int[Tensor, "batch pos"], spec: RepeatSpec,
                  chunk_size: int = 250, progress: bool = False) -> tuple[dict[str, Tensor], Tensor]:
    """Attention scores ``{name: [layer, head_index]}`` and mean loss per position ``[pos - 1]``."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    sums = {n: torch.zeros(n_layers, n_heads) for n in INDUCTION_SCORES}
    counts = {n: torch.zeros(n_layers) for n in INDUCTION_SCORES}
    loss_sum = torch.zeros(tokens.shape[1] - 1, dtype=torch.float64)
    for start in tqdm(range(0, len(tokens), chunk_size), disable=not progress, desc="induction"):
        rows = tokens[start:start + chunk_size]
        masks = {k: v.to(model.cfg.device) for k, v in induction_masks(rows, spec).items()}
        rows = rows.to(model.cfg.device)

        def hook(pattern, hook, rows=rows, masks=masks):
            for name, (s, c) in head_score_sums(pattern.float(), rows, masks).items():
                sums[name][hook.layer()] += s.cpu()
                counts[name][hook.layer()] += c.cpu()

        logits = model.run_with_hooks(rows, fwd_hooks=[(f"blocks.{i}.attn.hook_pattern", hook)
                                                       for i in range(n_layers)]).float()
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), rows[:, 1:].flatten(), reduction="none")
        loss_sum += nll.reshape(len(rows), -1).sum(0).double().cpu()
    scores = {n: sums[n] / counts[n][:, None].clamp(min=1) for n in INDUCTION_SCORES}
    scores = {n: torch.where(counts[n][:, None] > 0, s, torch.full_like(s, math.nan)) for n, s in scores.items()}
    return scores, (loss_sum / len(tokens)).float()


@torch.no_grad()
def induction_circuit(model: HookedTransformer, spec: RepeatSpec, n_rows: int = 1000, seed: int = 0,
                      folded: HookedTransformer | None = None, chunk_size: int = 250,
                      progress: bool = False, task_batch=None) -> InductionResult:
    """Every score of the module docstring for ``model`` on ``n_rows`` repeated random sequences.

    ``task_batch``: a ``Batch`` of the run's task; when given, the previous-token and induction scores are also
    read on it (``task_batch_scores``) and their carriers listed by the same rule (``task_carriers``).

    ``folded``: the LayerNorm-folded model the weight-based scores (copying, composition) are read
    from (default: ``model`` itself, right when it has no LayerNorm).
    """
    from toylens.analyze.qkov import copying_scores, full_ov_circuit

    tokens = repeated_tokens(spec, n_rows, seed)
    scores, loss_by_pos = repeat_scores(model, tokens, spec, chunk_size, progress)
    w = folded if folded is not None else model
    full_ov = full_ov_circuit(w)
    composition = {m: w.all_composition_scores(m).cpu() for m in ("Q", "K", "V")}
    labels = model.all_head_labels()
    early, late = icl_positions(len(loss_by_pos))
    task_scores, task_carriers = None, {}
    if task_batch is not None:
        task_scores = task_batch_scores(model, task_batch.tokens, task_batch.loss_mask, chunk_size)
        ind = carriers(labels, task_scores["induction"], range(1, model.cfg.n_layers))
        last = max([int(h["head"][1:].split("H")[0]) for h in ind] or [model.cfg.n_layers - 1])
        task_carriers = {"previous_token": carriers(labels, task_scores["previous_token"], range(last)),
                         "induction": ind}
    return InductionResult(
        head_labels=labels, scores=scores, copying=positive_eigenvalue_fraction(full_ov).cpu(),
        copying_signed=copying_scores(full_ov).cpu(), composition=composition, loss_by_pos=loss_by_pos,
        half_len=spec.half_len, start=spec.start, n_rows=n_rows, icl_early_pos=early, icl_late_pos=late,
        circuit=name_circuit(labels, scores, composition), task_scores=task_scores, task_carriers=task_carriers)


def induction_pairs(task, n_rows: int, seed: int):
    """Clean/corrupted ``PromptPairs`` of an induction task: the clean row, its ``task.corrupt`` (the first copy
    resampled), the answer at the second copy's last scored position; correct = the target, incorrect = the
    token an induction head would copy from the corrupted first copy."""
    from toylens.analyze.pairs import PromptPairs

    gen = torch.Generator().manual_seed(seed)
    clean = task.sample(n_rows, gen)
    corr = task.corrupt(clean, gen)
    n = clean.tokens.shape[1]
    pos = torch.arange(n)
    last = torch.where(clean.loss_mask, pos, -1).max(1).values  # last scored position per row
    rows = torch.arange(n_rows)
    q_tok = clean.tokens[rows, last]
    earlier = (clean.tokens == q_tok[:, None]) & (pos[None] < last[:, None]) & (pos[None] >= 1)
    first = torch.where(earlier, pos, n).min(1).values  # the earlier copy of the query's token
    wrong = corr.tokens[rows, (first + 1).clamp(max=n - 1)]
    right = clean.targets[rows, last]
    wrong = torch.where(wrong == right, (right % (task.d_vocab - 1)) + 1, wrong)
    return PromptPairs(clean.tokens, corr.tokens, last, torch.stack([right, wrong], 1)[:, :, None])


@torch.no_grad()
def composition_patching(model: HookedTransformer, pairs, circuit: dict) -> dict:
    """Which composition the induction heads rely on, by exact edge patching (``discovery.EdgeRunner``): the
    logit difference kept when the edges from every previous-token head into the induction heads' keys (K), queries
    (Q) or values (V) carry their corrupted value, as a share of clean minus all-corrupted (1 = nothing lost)."""
    from toylens.analyze.discovery import EdgeRunner

    runner = EdgeRunner(model, pairs, "logit_diff")
    g = runner.graph
    full = g.allowed.to(runner.A.dtype)
    out = {"clean_logit_diff": float(runner.clean_value), "corrupted_logit_diff": float(runner.corrupted_value),
           "n_prompts": pairs.batch_size}
    srcs = [h["head"] for h in circuit.get("previous_token_heads", [])]
    dsts = [h["head"] for h in circuit.get("induction_heads", [])]
    for part, name in (("k", "K"), ("q", "Q"), ("v", "V")):
        M = full.clone()
        edges = [(s, f"{d}.{part}") for s in srcs for d in dsts if g.sources.index(s) < len(g.sources)
                 and bool(g.allowed[g.sources.index(s), g.dests.index(f"{d}.{part}")])]
        for s, d in edges:
            M[g.index(s, d)] = 0
        out[name] = {"edges": len(edges), "recovered": runner.recovered(runner.value(runner.forward(M)))}
    lost = {m: 1 - out[m]["recovered"] for m in ("K", "Q", "V") if out[m]["edges"]}
    out["relies_on"] = max(lost, key=lost.get) if lost and max(lost.values()) > 0.1 else None
    return out
