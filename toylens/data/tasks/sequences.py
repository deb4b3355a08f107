"""``task=sequences task.path=<file>``: train on a file of the user's own token sequences.

Formats (``task.format=auto`` picks by suffix): ``.npy`` (an int array ``[n, seq_len]``, memory-mapped), ``.pt``
(a tensor, or a dict with ``tokens`` and optionally ``loss_mask`` and ``targets``; memory-mapped) and
``.safetensors`` (the same keys; safetensors maps the file itself), or text: one sequence a line, whitespace-
separated token ids or symbols (names from ``task.vocab``, a file of one name a line, else the symbols seen, sorted).

The loss is next-token by default (``targets[:, i] = tokens[:, i + 1]``, none at the last position or at padding);
``task.loss=given`` uses the file's ``targets`` and ``loss_mask``. A fixed share ``task.frac_train`` of the sequences
is trained on and the rest held out, by a hash of each sequence (equal sequences fall on the same side). The whole
file is checked once, in chunks, when the task is made: every problem is one line naming the file and the row.
Details: docs/sequences.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from toylens.data.base import Batch, Task, TaskConfig, register_task
from toylens.data.tasks._common import input_codes, require, split_u

CHUNK = 65_536  # rows per validation/hash pass: a big memory-mapped file is never copied whole


@dataclass
class SequencesConfig(TaskConfig):
    name: str = "sequences"
    path: str = "???"  # the file: .npy/.pt/.safetensors int array [n, seq_len], or text (one sequence a line)
    format: str = "auto"  # auto (by suffix) | npy | pt | safetensors | text
    loss: str = "next_token"  # next_token | given (the file's targets and loss_mask)
    d_vocab: int | None = None  # null: the largest id + 1 (text symbols: the vocabulary's size)
    vocab: str | None = None  # text: a file of token names, one a line (the symbols' ids); null: symbols seen, sorted
    names: list[str] | None = None  # text symbols: the token names by id, pinned by a run (task.vocab is then not read)
    pad: str | None = None  # text: right-pad shorter rows with this token, no loss there; null: ragged rows are errors
    frac_train: float = 0.9  # share of sequences trained on; the rest held out by a hash of each sequence
    split_seed: int = 0  # seed of that hash
    sha256: str | None = None  # the file's SHA-256 (a run records it; a file changed since then warns)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_WARNED: set[tuple[str, str, str]] = set()  # (file, hash was, hash now) already warned about in this process


def _check_hash(path: Path, recorded: str) -> None:
    """Warn (once per process: a run's task is rebuilt several times by one command) when the file is not the one
    the run recorded."""
    now = _sha256(path)
    if now != recorded and (str(path), recorded, now) not in _WARNED:
        _WARNED.add((str(path), recorded, now))
        warnings.warn(f"task.path={path} changed since the run (sha256 was {recorded[:12]}, now {now[:12]}): the "
                      f"split and batches may differ", stacklevel=3)


def _is_int(a) -> bool:
    if isinstance(a, torch.Tensor):
        return not (a.dtype.is_floating_point or a.dtype.is_complex or a.dtype == torch.bool)
    return np.issubdtype(a.dtype, np.integer)


def _rows(a, lo: int, hi: int) -> torch.Tensor:
    part = a[lo:hi]
    return part if isinstance(part, torch.Tensor) else torch.from_numpy(np.array(part))  # a copy: memmaps are read-only


@register_task
class Sequences(Task):
    name = "sequences"
    config_cls = SequencesConfig

    def __init__(self, cfg: SequencesConfig):
        super().__init__(cfg)
        if cfg.path in ("???", ""):
            raise ValueError("task.path=???: no file given; add task.path=<your file of sequences> (.npy, .pt, "
                             ".safetensors, or text: one sequence a line)")
        self.path = Path(cfg.path).expanduser().absolute()
        where = f"task.path={cfg.path}: {self.path}"
        if not self.path.is_file():
            # a recorded (absolute) path is not "relative to where you run": saying so would mislead
            fix = ("give the path of an existing file" if Path(cfg.path).expanduser().is_absolute()
                   else "give a path relative to where you run, or an absolute one")
            raise ValueError(f"{where}: no such file; {fix}")
        fmt = cfg.format if cfg.format != "auto" else {".npy": "npy", ".pt": "pt", ".safetensors": "safetensors"}.get(
            self.path.suffix.lower(), "text")
        require(fmt in ("npy", "pt", "safetensors", "text"), "format", cfg.format, "is unknown; choose auto, npy, pt, "
                "safetensors or text")
        require(cfg.loss in ("next_token", "given"), "loss", cfg.loss, "is unknown; choose next_token or given")
        require(0 < cfg.frac_train < 1, "frac_train", cfg.frac_train, "must lie in (0, 1), e.g. 0.9")
        if cfg.sha256 is not None:
            _check_hash(self.path, cfg.sha256)
        self.names: list[str] | None = None
        self._distinct: bool | None = None  # two different training rows exist (corrupt() pairs them)
        self.lengths: np.ndarray | None = None  # text with padding: each row's own length
        data = self._read_text(where) if fmt == "text" else self._read_array(fmt, where)
        self.tokens, self.given_mask, self.given_targets = data
        self._check(where)
        self._split(where)

    # --- reading -------------------------------------------------------------------------------
    def _read_array(self, fmt: str, where: str):
        try:
            if fmt == "npy":
                obj = np.load(self.path, mmap_mode="r", allow_pickle=False)
            elif fmt == "pt":
                obj = torch.load(self.path, weights_only=True, mmap=True, map_location="cpu")
            else:
                from safetensors.torch import load_file

                obj = load_file(str(self.path))
        except Exception as e:
            raise ValueError(f"{where}: {_unreadable(self.path, fmt, e)}") from None
        if isinstance(obj, dict):
            require("tokens" in obj, "path", self.cfg.path, f"({self.path}) holds {sorted(obj)[:6]} but no "
                    f"'tokens'; save the sequences under the key tokens")
            return obj["tokens"], obj.get("loss_mask"), obj.get("targets")
        require(isinstance(obj, (np.ndarray, torch.Tensor)), "path", self.cfg.path,
                f"({self.path}) holds a {type(obj).__name__}, not an array; save an int array [n, seq_len]")
        return obj, None, None

    def _read_text(self, where: str):
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{where}: not a readable text file ({type(e).__name__}); give UTF-8 text, one "
                             f"sequence a line, or set task.format") from None
        rows = [(i + 1, line.split()) for i, line in enumerate(lines) if line.strip()]
        require(bool(rows), "path", self.cfg.path, f"({self.path}) holds no sequences; write one sequence a line")
        if self.cfg.names is not None:  # pinned by the run: its ids never move, whatever the file holds now
            self.names = list(self.cfg.names)
        elif self.cfg.vocab is not None:
            vpath = Path(self.cfg.vocab).expanduser().absolute()
            if not vpath.is_file():
                raise ValueError(f"task.vocab={self.cfg.vocab}: no such file {vpath}")
            self.names = [n for n in vpath.read_text(encoding="utf-8").split()]
        elif all(t.lstrip("-").isdigit() for _, r in rows for t in r) and (self.cfg.pad is None or
                                                                          self.cfg.pad.lstrip("-").isdigit()):
            self.names = None  # token ids
        else:
            self.names = sorted({t for _, r in rows for t in r} | ({self.cfg.pad} if self.cfg.pad else set()))
        index = {n: i for i, n in enumerate(self.names)} if self.names is not None else None
        width = max(len(r) for _, r in rows)
        pad_id = None
        if self.cfg.pad is not None:
            pad_id = index.get(self.cfg.pad) if index is not None else int(self.cfg.pad)
            require(pad_id is not None, "pad", self.cfg.pad, "is not in task.vocab; add it or choose another")
        out = np.zeros((len(rows), width), dtype=np.int64)
        lengths = np.zeros(len(rows), dtype=np.int64)
        for k, (line, r) in enumerate(rows):
            if len(r) != width and pad_id is None:
                raise ValueError(f"{where}: line {line} has {len(r)} tokens, line {rows[0][0]} has {len(rows[0][1])}: "
                                 f"every sequence needs the same length; set task.pad=<token> to pad shorter ones")
            try:
                ids = [index[t] for t in r] if index is not None else [int(t) for t in r]
            except KeyError as e:
                raise ValueError(f"{where}: line {line}: {self._unknown_symbol(e.args[0])}") from None
            out[k, : len(ids)] = ids
            if pad_id is not None:
                out[k, len(ids):] = pad_id
            lengths[k] = len(ids)
        self.lengths = lengths if pad_id is not None else None
        self.line_of = [line for line, _ in rows]
        return out, None, None

    def _unknown_symbol(self, symbol: str) -> str:
        if self.cfg.names is not None:
            return (f"symbol {symbol!r} is not in the run's vocabulary (task.names: the {len(self.names)} symbols "
                    f"pinned when it trained); restore the file the run trained on, or train a new run on this one")
        return f"token {symbol!r} is not in task.vocab ({self.cfg.vocab}); add it there"

    # --- checking, once ------------------------------------------------------------------------
    def _row_name(self, i: int) -> str:
        lines = getattr(self, "line_of", None)
        return f"line {lines[i]}" if lines else f"row {i} (0-based)"

    def _check(self, where: str) -> None:
        t = self.tokens
        require(t.ndim == 2 and t.shape[0] > 0 and t.shape[1] > 1, "path", self.cfg.path,
                f"({self.path}) holds an array of shape {list(t.shape)}; give [n_sequences >= 1, seq_len >= 2]")
        require(_is_int(t), "path", self.cfg.path, f"({self.path}) holds {t.dtype} tokens; save integer token ids "
                f"(e.g. array.astype('int64'))")
        n, largest = t.shape[0], -1
        for lo in range(0, n, CHUNK):
            part = _rows(t, lo, lo + CHUNK)
            bad = (part < 0).any(1).nonzero()
            if len(bad):
                raise ValueError(f"{where}: {self._row_name(lo + int(bad[0]))} holds a negative token id; ids are "
                                 f"0 .. d_vocab-1")
            largest = max(largest, int(part.max()))
        if self.cfg.d_vocab is None:
            self._d_vocab = len(self.names) if self.names is not None else largest + 1
        else:
            self._d_vocab = self.cfg.d_vocab
        if largest >= self._d_vocab:
            for lo in range(0, n, CHUNK):
                part = _rows(t, lo, lo + CHUNK)
                bad = (part >= self._d_vocab).any(1).nonzero()
                if len(bad):
                    i = int(bad[0])
                    raise ValueError(f"task.d_vocab={self._d_vocab}: {self.path} {self._row_name(lo + i)} holds token "
                                     f"id {int(part[i].max())}; raise task.d_vocab, or null (the largest id + 1)")
        if self.cfg.loss == "given":
            for key, a in (("loss_mask", self.given_mask), ("targets", self.given_targets)):
                require(a is not None, "loss", "given", f"needs {self.path} to hold {key} too (a dict of tokens, "
                        f"loss_mask, targets); or task.loss=next_token")
                require(tuple(a.shape) == tuple(t.shape), "loss", "given", f"needs {key} of the tokens' shape "
                        f"{list(t.shape)}, {self.path}'s is {list(a.shape)}")
            for lo in range(0, n, CHUNK):
                mask = _rows(self.given_mask, lo, lo + CHUNK).bool()
                empty = (~mask.any(1)).nonzero()
                if len(empty):
                    raise ValueError(f"{where}: {self._row_name(lo + int(empty[0]))} has no loss_mask position; every "
                                     f"sequence needs one")
                tgt = _rows(self.given_targets, lo, lo + CHUNK).long()
                off = (mask & ((tgt < 0) | (tgt >= self._d_vocab))).any(1).nonzero()
                if len(off):
                    raise ValueError(f"{where}: {self._row_name(lo + int(off[0]))} has a target outside [0, "
                                     f"{self._d_vocab}) where loss_mask is set")
        elif self.lengths is not None and int(self.lengths.min()) < 2:
            i = int(np.argmin(self.lengths))
            raise ValueError(f"{where}: {self._row_name(i)} has one token, so no next token to predict; drop it")

    def _split(self, where: str) -> None:
        held = []
        for lo in range(0, self.tokens.shape[0], CHUNK):
            held.append(split_u(input_codes(_rows(self.tokens, lo, lo + CHUNK).long()), self.cfg.split_seed)
                        >= self.cfg.frac_train)
        held_out = torch.cat(held)
        self.train_rows, self.held_rows = (~held_out).nonzero().squeeze(1), held_out.nonzero().squeeze(1)
        for side, rows in (("training", self.train_rows), ("held-out", self.held_rows)):
            require(len(rows) > 0, "frac_train", self.cfg.frac_train, f"leaves the {side} side of {self.path}'s "
                    f"{self.tokens.shape[0]} sequence(s) empty; use more sequences or another task.frac_train")

    # --- the Task contract ---------------------------------------------------------------------
    @property
    def d_vocab(self) -> int:
        return self._d_vocab

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def token_names(self) -> list[str]:
        names = list(self.names or [])
        return names + [str(i) for i in range(len(names), self._d_vocab)]

    def _batch(self, rows: torch.Tensor, device) -> Batch:
        idx = rows.cpu().numpy()
        tokens = _gather(self.tokens, idx).long()
        if self.cfg.loss == "given":
            mask = _gather(self.given_mask, idx).bool()
            targets = _gather(self.given_targets, idx).long().masked_fill(~mask, 0)
        else:
            targets = torch.zeros_like(tokens)
            targets[:, :-1] = tokens[:, 1:]
            length = (torch.from_numpy(self.lengths[idx]) if self.lengths is not None
                      else torch.full((len(idx),), tokens.shape[1]))
            mask = torch.arange(tokens.shape[1])[None, :] < (length[:, None] - 1)
        return Batch(tokens, targets, mask).to(device)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        pick = torch.randint(0, len(self.train_rows), (batch_size,), generator=generator, device=generator.device)
        return self._batch(self.train_rows[pick.cpu()], generator.device)

    def eval_set(self, size: int, seed: int, device: torch.device | str = "cpu") -> Batch:
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randint(0, len(self.held_rows), (size,), generator=gen)
        return self._batch(self.held_rows[pick], device)

    def corrupt_unavailable(self) -> str | None:
        """corrupt() pairs a row with another, different training row: none exists when the training side holds
        one distinct sequence (a tiny file), so it is not offered then, and this says why."""
        if self._distinct_training_rows():
            return None
        n = len(self.train_rows)
        return (f"task.path={self.path}: corrupt() needs at least 2 distinct training sequences to pair, the training "
                f"side holds {n} row(s) and no two differ; add sequences to the file (or raise task.frac_train)")

    def _distinct_training_rows(self) -> bool:
        """Whether two training rows differ; read in chunks (a big file stops at its first chunk), once."""
        if self._distinct is None:
            first = _gather(self.tokens, self.train_rows[:1].numpy())
            self._distinct = any(bool((_gather(self.tokens, self.train_rows[lo: lo + CHUNK].numpy()) != first).any())
                                 for lo in range(0, len(self.train_rows), CHUNK))
        return self._distinct

    def corrupt(self, batch: Batch, generator: torch.Generator) -> Batch:
        """Other training sequences, each different from its clean row (redrawn where equal)."""
        why = self.corrupt_unavailable()
        if why:
            raise NotImplementedError(why)
        out = self.sample(len(batch), generator)
        for _ in range(20):
            same = (out.tokens == batch.tokens).all(1)
            if not bool(same.any()):
                break
            fresh = self.sample(int(same.sum()), generator)
            rows = same.nonzero().squeeze(1)
            out = Batch(out.tokens.index_copy(0, rows, fresh.tokens), out.targets.index_copy(0, rows, fresh.targets),
                        out.loss_mask.index_copy(0, rows, fresh.loss_mask))
        return out

    def pinned_config(self) -> SequencesConfig:
        """The file's absolute path and hash, and the vocabulary as trained (``d_vocab``, and a symbol file's token
        names): the run decodes with its own ids even when the file gains a symbol that would sort earlier."""
        vocab = str(Path(self.cfg.vocab).expanduser().absolute()) if self.cfg.vocab else None
        names = list(self.names) if self.names is not None else None
        return dataclasses.replace(self.cfg, path=str(self.path), vocab=vocab, sha256=_sha256(self.path),
                                   d_vocab=self._d_vocab, names=names)


def _unreadable(path: Path, fmt: str, e: Exception) -> str:
    """Why an array file cannot be read, and the fix (numpy's own text is about unpickling, which is refused)."""
    if fmt == "npy":
        with open(path, "rb") as f:
            is_npy = f.read(6) == b"\x93NUMPY"
        what = ("a .npy of pickled Python objects (refused: loading it could run code)" if is_npy
                else "not a numpy .npy array file (no .npy header)")
        return f"{what}; save the sequences with np.save(path, int_array), or set task.format=text for a text file"
    text = " ".join(str(e).split())
    text = text if len(text) <= 120 else text[:120].rsplit(" ", 1)[0] + " ..."
    return f"not a readable {fmt} file ({type(e).__name__}: {text}); check task.format"


def _gather(a, idx: np.ndarray) -> torch.Tensor:
    """Rows ``idx`` of an array or tensor (a memory-mapped file reads only those rows)."""
    if isinstance(a, torch.Tensor):
        return a[torch.from_numpy(idx)]
    return torch.from_numpy(np.ascontiguousarray(a[idx]))
