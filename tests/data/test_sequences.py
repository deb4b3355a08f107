"""task=sequences: the user's own token sequences from a file (npy / pt / safetensors / text)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from toylens.data import make_task
from toylens.data.contract import check_task
from toylens.data.tasks._common import input_codes, split_u
from toylens.data.tasks.sequences import SequencesConfig

V, L = 13, 9


def counting(n: int = 400, seed: int = 0) -> np.ndarray:
    """Rows that count up modulo V from a random start by a step of 1 or 2: learnable, many distinct rows."""
    rng = np.random.default_rng(seed)
    start, step = rng.integers(0, V, (n, 1)), rng.integers(1, 3, (n, 1))
    return (start + step * np.arange(L)[None]) % V


def task_of(path, **kw):
    return make_task(SequencesConfig(path=str(path), **kw))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def npy(tmp_path):
    rows = counting()
    path = tmp_path / "seqs.npy"
    np.save(path, rows.astype(np.int16))
    return path, rows


def test_batches_are_the_files_rows_with_next_token_targets(npy):
    path, rows = npy
    task = task_of(path)
    assert isinstance(task.tokens, np.memmap)  # memory-mapped, not read whole
    assert (task.d_vocab, task.seq_len) == (int(rows.max()) + 1, L)
    b = task.sample(64, gen())
    file_rows = {tuple(r) for r in rows.tolist()}
    assert b.tokens.dtype == torch.long and all(tuple(r) in file_rows for r in b.tokens.tolist())
    assert torch.equal(b.targets[:, :-1], b.tokens[:, 1:])
    assert b.loss_mask[:, :-1].all() and not b.loss_mask[:, -1].any()
    again = task.sample(64, gen())
    assert torch.equal(b.tokens, again.tokens)
    assert "accuracy" in check_task(task)


def test_held_out_rows_never_appear_in_training(npy):
    path, rows = npy
    task = task_of(path, frac_train=0.7, split_seed=3)
    held = split_u(input_codes(torch.from_numpy(rows).long()), 3) >= 0.7
    held_rows = {tuple(r) for r in rows[held.numpy()].tolist()}
    assert 0.2 < held.float().mean() < 0.4 and held_rows
    g = gen(5)
    for _ in range(30):
        b = task.sample(128, g)
        assert not any(tuple(r) in held_rows for r in b.tokens.tolist())
        assert not bool((split_u(input_codes(b.tokens), 3) >= 0.7).any())
    ev = task.eval_set(256, 11)
    assert all(tuple(r) in held_rows for r in ev.tokens.tolist())
    assert torch.equal(ev.tokens, task.eval_set(256, 11).tokens)


def test_pt_and_safetensors_dicts_with_their_own_mask_and_targets(tmp_path):
    from safetensors.torch import save_file

    tokens = torch.from_numpy(counting(50)).long()
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, 4] = True
    targets = torch.zeros_like(tokens)
    targets[:, 4] = tokens[:, 0]  # "recall the first token at position 4"
    torch.save({"tokens": tokens, "loss_mask": mask, "targets": targets}, tmp_path / "d.pt")
    save_file({"tokens": tokens.int(), "loss_mask": mask, "targets": targets}, str(tmp_path / "d.safetensors"))
    for name in ("d.pt", "d.safetensors"):
        task = task_of(tmp_path / name, loss="given", frac_train=0.5)
        b = task.sample(32, gen())
        assert b.loss_mask.sum(1).tolist() == [1] * 32 and torch.equal(b.targets[:, 4], b.tokens[:, 0])
        assert "accuracy" in check_task(task)
    plain = task_of(tmp_path / "d.pt")  # next_token ignores the file's own mask and targets
    assert plain.sample(4, gen()).loss_mask[:, :-1].all()


def test_text_of_symbols_with_a_vocab_and_padding(tmp_path):
    (tmp_path / "v.txt").write_text("<pad>\na\nb\nc\nd\n")
    (tmp_path / "s.txt").write_text("a b c d\n\nb c d\nc d a b\nd a\n" * 5)
    task = task_of(tmp_path / "s.txt", vocab=str(tmp_path / "v.txt"), pad="<pad>", frac_train=0.5)
    assert task.token_names == ["<pad>", "a", "b", "c", "d"] and task.seq_len == 4
    b = task.eval_set(40, 0)
    for toks, mask in zip(b.tokens.tolist(), b.loss_mask.tolist(), strict=True):
        n = len([t for t in toks if t != 0])
        assert mask == [i < n - 1 for i in range(4)]  # no loss at or after the last real token
    ids = task_of(tmp_path / "s.txt", frac_train=0.5, pad="<pad>")  # vocab: the symbols seen, sorted
    assert ids.token_names == ["<pad>", "a", "b", "c", "d"]
    (tmp_path / "ids.txt").write_text("1 2 3\n4 5 6\n7 8 9\n3 2 1\n")
    t = task_of(tmp_path / "ids.txt", frac_train=0.5)
    assert t.d_vocab == 10 and t.token_names[7] == "7"


@pytest.mark.parametrize("name,content,kw,needle", [
    ("ragged.txt", "1 2 3\n4 5\n", {}, "line 2 has 2 tokens"),
    ("big.txt", "1 2 3\n4 5 60\n", {"d_vocab": 10}, "line 2 holds token id 60"),
    ("empty.txt", "\n\n", {}, "holds no sequences"),
    ("sym.txt", "a b\nb z\n", {"vocab": "VOCAB"}, "line 2: token 'z' is not in task.vocab"),
    ("float.npy", np.ones((4, 3), dtype=np.float32), {}, "holds float32 tokens"),
    ("flat.npy", np.arange(5), {}, "shape [5]"),
    ("neg.npy", np.array([[1, 2], [3, -1]]), {}, "row 1 (0-based) holds a negative token id"),
    ("garbage.npy", b"\x00\xffnot numpy", {}, "not a numpy .npy array file (no .npy header); save the sequences "
                                              "with np.save(path, int_array), or set task.format=text"),
    ("pickled.npy", np.array([{"a": 1}], dtype=object), {}, "a .npy of pickled Python objects (refused"),
    ("nomask.pt", {"tokens": torch.ones(3, 4, dtype=torch.long)}, {"loss": "given"}, "nomask.pt to hold loss_mask"),
    ("missing.npy", None, {}, "no such file"),
])
def test_bad_files_are_one_line_naming_the_file_and_row(tmp_path, name, content, kw, needle):
    path = tmp_path / name
    (tmp_path / "VOCAB").write_text("a\nb\n")
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, np.ndarray):
        np.save(path, content, allow_pickle=True)
    elif isinstance(content, dict):
        torch.save(content, path)
    kw = {k: (str(tmp_path / v) if k == "vocab" else v) for k, v in kw.items()}
    with pytest.raises(ValueError) as e:
        task_of(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg and needle in msg and msg.startswith("task.") and name in msg, msg


def test_pinned_config_is_absolute_with_the_hash_and_a_changed_file_warns(npy, tmp_path, monkeypatch):
    import hashlib

    path, rows = npy
    monkeypatch.chdir(path.parent)
    pinned = task_of(path.name).pinned_config()
    assert pinned.path == str(path) and pinned.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    np.save(path, rows[::-1].astype(np.int16))
    with pytest.warns(UserWarning, match=rf"sha256 was {pinned.sha256[:12]}, now [0-9a-f]{{12}}"):
        make_task(pinned)


def test_it_trains_on_a_generated_file_and_the_cli_refuses_a_bad_one(npy, tmp_path, tiny):
    from toylens.runs import checkpoint as ck
    from toylens.train.loop import train

    path, _ = npy
    cfg = tiny(**{"train.steps": 120, "train.eval_every": 20, "train.batch_size": 32, "optim.lr": 3e-3})
    cfg.task = SequencesConfig(path=str(path), frac_train=0.8)
    cfg.model.positional_embedding_type = "standard"
    res = train(cfg)
    losses = [r["eval/loss"] for r in ck.read_metrics(res.run_dir) if "eval/loss" in r]
    assert losses[-1] < min(losses[0], 0.5 * math.log(V)), losses  # well below guessing uniformly (ln 13 = 2.56)
    (tmp_path / "bad.txt").write_text("1 2 3\n4 5\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", HYDRA_FULL_ERROR="0")
    p = subprocess.run([sys.executable, "-m", "toylens.train.cli", "task=sequences", "task.path=bad.txt",
                        f"checkpoint_root={tmp_path / 'ck'}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "line 2 has 2 tokens" in lines[0], p.stderr
    assert not (tmp_path / "ck").exists()


def test_a_recorded_absolute_path_that_is_gone_says_so_without_relative_advice(tmp_path):
    with pytest.raises(ValueError) as e:
        task_of(tmp_path / "gone.npy")
    assert str(e.value) == f"task.path={tmp_path / 'gone.npy'}: {tmp_path / 'gone.npy'}: no such file; give the path " \
                           f"of an existing file"
    with pytest.raises(ValueError, match=r"no such file; give a path relative to where you run, or an absolute one"):
        task_of("surely_not_here.npy")


def test_a_symbol_files_vocabulary_is_pinned_and_a_new_symbol_is_one_line(tmp_path):
    """The pinned config carries d_vocab and the token names, so the run decodes with its own ids; a symbol outside
    them (here 'a', which would sort first and renumber every id) is one line naming the file, the line, the symbol."""
    path = tmp_path / "s.txt"
    path.write_text("b c d e\nc d e b\nd e b c\ne b c d\n" * 5)
    pinned = task_of(path, frac_train=0.5).pinned_config()
    assert (pinned.d_vocab, pinned.names) == (4, ["b", "c", "d", "e"])
    path.write_text(path.read_text() + "e e e e\n")  # known symbols only: the same ids
    with pytest.warns(UserWarning, match="changed since the run"):
        again = make_task(pinned)
    assert again.token_names == ["b", "c", "d", "e"] and int(again.tokens[-1, 0]) == 3
    path.write_text(path.read_text() + "a b c d\n")
    with pytest.warns(UserWarning, match="changed since the run"), pytest.raises(ValueError) as e:
        make_task(pinned)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "line 22: symbol 'a' is not in the run's vocabulary" in msg, msg
    assert make_task(SequencesConfig(path=str(path), frac_train=0.5)).token_names[0] == "a"  # unpinned: renumbered


def test_a_tiny_file_trains_but_offers_no_pairs_and_says_why(tmp_path):
    from toylens.data.contract import corrupt_reason, offers_corrupt

    path = tmp_path / "tiny.txt"
    path.write_text("1 2 3\n4 5 6\n")  # one row on each side of the split
    task = task_of(path)
    assert len(task.train_rows) == 1 and not offers_corrupt(task)
    why = corrupt_reason(task)
    assert why == (f"task.path={path}: corrupt() needs at least 2 distinct training sequences to pair, the training "
                   f"side holds 1 row(s) and no two differ; add sequences to the file (or raise task.frac_train)")
    passed = check_task(task)  # the contract holds: corrupt() is not offered, so not checked
    assert "corrupt" not in passed and "accuracy" in passed
    with pytest.raises(NotImplementedError, match="at least 2 distinct training sequences"):
        task.corrupt(task.sample(2, gen()), gen())
    path.write_text("\n".join(" ".join(map(str, row)) for row in counting(20).tolist()))
    assert offers_corrupt(task_of(path))  # different training rows: pairs again
