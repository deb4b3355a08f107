"""Ground truth for circuit discovery from tracr's craft model: an edge ``u -> v`` is real when u writes a residual
direction v reads (q / k / v, the MLP input, or the output space the unembedding reads); clean/corrupted pairs of
program inputs; a few compiled programs from ``tracr.compiler.lib`` as a benchmark set. Needs ``toylens[tracr]``."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import numpy as np
import torch

from toylens._compat import HookedTransformer
from toylens.analyze.pairs import PromptPairs
from toylens.model.tracr import TracrProgram, _unembed_matrix, compile_program


def _rows(space, matrix) -> dict[str, np.ndarray]:
    """Each direction of ``space`` -> its row of ``matrix`` (the block's weights on that direction)."""
    return {str(d): np.asarray(matrix)[i] for i, d in enumerate(space.basis)}


def _groups(dirs: set[str]) -> dict[str, list[str]]:
    """Directions by the RASP value they encode (``"length_5:3"`` -> ``"length_5"``)."""
    out: dict[str, list[str]] = {}
    for d in sorted(dirs):
        out.setdefault(d.rpartition(":")[0] or d, []).append(d)
    return out


def _tells_apart(rows: dict[str, np.ndarray], written: set[str], pad_is_a_value: bool) -> bool:
    """Whether the weights ``rows`` give two values of one written RASP variable different reads (a direction the
    block does not read has a zero row). ``pad_is_a_value``: a PAD position (no token direction) counts as a value,
    which matters only for keys: tracr never selects a PAD key, so a PAD position's queries, values and MLP
    outputs reach no other position."""
    width = len(next(iter(rows.values()))) if rows else 0
    for name, dirs in _groups(written).items():
        if not any(d in rows for d in dirs):
            continue
        vals = [rows.get(d, np.zeros(width)) for d in dirs] + ([np.zeros(width)] if pad_is_a_value and
                                                                name == "tokens" else [])
        if len(vals) == 1 or any(not np.array_equal(vals[0], v) for v in vals[1:]):
            return True
    return False


def true_edges(prog: TracrProgram, input_dependent: bool = True) -> set[tuple[str, str]]:
    """Every edge of the discovery graph that tracr built, read off the craft blocks' residual spaces and weights.

    ``input_dependent=False``: u writes a direction v reads. ``True`` (default): u writes a value that can change
    with the input and v's weights tell its values apart. Constant directions (BOS at position 0, ``one``, the
    positions) and the outputs of blocks reading nothing input-dependent carry nothing a corruption can change,
    nor does a read that weighs every value the same (the query of ``Select(tokens, tokens, TRUE)``, as in
    ``length``). Only these edges can move a metric when a prompt is corrupted, so only these can be found."""
    labels = prog.assembled.residual_labels
    params = prog.assembled.params
    emb = (abs(params["token_embed"]["embeddings"]).sum(0) + abs(params["pos_embed"]["embeddings"]).sum(0)) > 0
    embed_all = {lab for lab, on in zip(labels, emb.tolist(), strict=True) if on}
    tokens = {f"tokens:{v}" for v in prog.vocab}
    writers: list[tuple[str, set[str]]] = [("embed", embed_all & tokens if input_dependent else embed_all)]
    edges: set[tuple[str, str]] = set()

    def read(dst: str, rows: dict[str, np.ndarray], key: bool = False) -> bool:
        hit = False
        for src, written in writers:
            if written & set(rows) and (not input_dependent or _tells_apart(rows, written, key)):
                edges.add((src, dst))
                hit = True
        return hit

    for block, (layer, kind) in zip(prog.craft.blocks, prog.sites, strict=True):
        if kind == "mlp":
            live = read(f"MLP{layer}", _rows(block.fst.input_space, block.fst.matrix))
            writers.append((f"MLP{layer}", _dirs(block.snd.output_space) if live or not input_dependent else set()))
            continue
        new = []  # heads of one layer read the same residual stream: none sees another's output
        for h, head in enumerate(block.as_multi().heads()):
            qk, ov = head.w_qk, head.w_ov
            live = [read(f"L{layer}H{h}.q", _rows(qk.left_space, qk.matrix)),
                    read(f"L{layer}H{h}.k", _rows(qk.right_space, np.asarray(qk.matrix).T), key=True),
                    read(f"L{layer}H{h}.v", _rows(ov.input_space, ov.matrix))]
            new.append((f"L{layer}H{h}", _dirs(ov.output_space) if any(live) or not input_dependent else set()))
        writers.extend(new)
    w_u = _unembed_matrix(prog.assembled)
    read("logits", {lab: w_u[i] for i, lab in enumerate(labels) if abs(w_u[i]).sum() > 0})
    return edges


def _dirs(space) -> set[str]:
    return {str(d) for d in space.basis}


def pairs_from_inputs(prog: TracrProgram, model: HookedTransformer, clean: list[list], corrupted: list[list]
                      ) -> PromptPairs:
    """Pairs answered at the first position (in both inputs) whose decoded output differs; pairs whose outputs agree
    everywhere are dropped. Answers: [clean output, corrupted output] as output ids."""
    with torch.no_grad():
        a = prog.decode(model(prog.encode(clean).to(model.cfg.device)))
        b = prog.decode(model(prog.encode(corrupted).to(model.cfg.device)))
    rows, pos, answers = [], [], []
    for i, (x, y) in enumerate(zip(clean, corrupted, strict=True)):
        diff = [p for p in range(1, min(len(x), len(y)) + 1) if a[i][p] != b[i][p]]
        if diff:
            rows.append(i)
            pos.append(diff[0])
            answers.append([[prog.output_id(a[i][diff[0]])], [prog.output_id(b[i][diff[0]])]])
    if not rows:
        raise ValueError("no pair changes the program's output; corrupt the inputs differently")
    keep = [clean[i] for i in rows], [corrupted[i] for i in rows]
    return PromptPairs(prog.encode(keep[0]), prog.encode(keep[1]), torch.tensor(pos), torch.tensor(answers))


# --- a benchmark set: programs from tracr's own library, and how to corrupt their inputs -------------------------
@dataclasses.dataclass(frozen=True)
class Example:
    make: Callable  # () -> rasp.SOp
    vocab: frozenset
    max_seq_len: int
    sample: Callable  # (random.Random, vocab, max_seq_len) -> (clean input, corrupted input)

    def compile(self) -> TracrProgram:
        return compile_program(self.make(), set(self.vocab), self.max_seq_len)

    def inputs(self, n: int, seed: int = 0) -> tuple[list[list], list[list]]:
        rng = random.Random(seed)
        pairs = [self.sample(rng, sorted(self.vocab), self.max_seq_len) for _ in range(n)]
        return [p[0] for p in pairs], [p[1] for p in pairs]


def _edit(rng: random.Random, vocab: list, n: int, x: list, unique: bool = False) -> list:
    """One token replaced, or (half the time) the input one token longer or shorter."""
    y = list(x)
    free = [v for v in vocab if v not in x] if unique else vocab
    if rng.random() < 0.5 or not free:
        i = rng.randrange(len(y))
        y[i] = rng.choice([v for v in (free or vocab) if v != y[i]])
    elif len(y) < n and (rng.random() < 0.5 or len(y) <= 2):
        y.append(rng.choice(free))
    else:
        y.pop()
    return y


def _random_input(rng: random.Random, vocab: list, n: int, unique: bool) -> list:
    k = rng.randint(2, min(n, len(vocab)) if unique else n)
    return rng.sample(vocab, k) if unique else [rng.choice(vocab) for _ in range(k)]


def _sampler(unique: bool) -> Callable:
    def sample(rng, vocab, n):
        x = _random_input(rng, vocab, n, unique)
        return x, _edit(rng, vocab, n, x, unique)
    return sample


def _lib(name: str, *args, **kwargs) -> Callable:
    def make():
        from tracr.compiler import lib
        from tracr.rasp import rasp

        return getattr(lib, name)(*[rasp.tokens if a == "tokens" else a for a in args], **kwargs)
    return make


EXAMPLES = {
    "reverse": Example(_lib("make_reverse", "tokens"), frozenset({1, 2, 3}), 5, _sampler(unique=False)),
    "hist": Example(_lib("make_hist"), frozenset({1, 2, 3}), 5, _sampler(unique=False)),
    "sort_unique": Example(_lib("make_sort_unique", "tokens", "tokens"), frozenset({1, 2, 3, 4, 5, 6}), 5,
                           _sampler(unique=True)),
    "sort": Example(_lib("make_sort", "tokens", "tokens", max_seq_len=5, min_key=1), frozenset({1, 2, 3, 4}), 5,
                    _sampler(unique=False)),
    "shuffle_dyck": Example(_lib("make_shuffle_dyck", ["()"]), frozenset({"(", ")"}), 6, _sampler(unique=False)),
}


def roc_auc(edges: list[dict], truth: set[tuple[str, str]], rel_tol: float = 0.0) -> float:
    """ROC AUC of |score| separating ``truth`` from every other edge (ties count half). ``rel_tol``: scores with
    |score| <= rel_tol * max |score| count as 0, so that numerical dust (a gradient of 1e-20 through a saturated
    softmax) is not mistaken for a ranking."""
    top = max((abs(e["score"]) for e in edges), default=0.0)
    mag = {(e["src"], e["dst"]): (abs(e["score"]) if abs(e["score"]) > rel_tol * top else 0.0) for e in edges}
    pos = [v for k, v in mag.items() if k in truth]
    neg = [v for k, v in mag.items() if k not in truth]
    if not pos or not neg:
        raise ValueError(f"AUC needs true and false edges; got {len(pos)} true and {len(neg)} false")
    return sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))
