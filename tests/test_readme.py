"""The README's commands run as written: every ```bash and ```python block is extracted and run, on
tiny settings, in a scratch working directory.

Tiny settings are what a user would append to check that a command runs: each ``toylens-train``
gets ``TINY_TRAIN`` appended (Hydra: the last value of a key wins; a resume only ``train.steps``),
each ``toylens-analyze`` ``TINY_ANALYZE`` (and ``TINY_LLC`` over checkpoints), each ``toylens-sae``
``TINY_SAE``; a Python ``cfg = TrainConfig(...)`` line is followed by the same settings as attribute
assignments. Placeholders are filled from what earlier commands printed: ``<... run directory>``/``<dir>``
is the last run directory, a dated ``checkpoints/<name>/<time>`` the newest run of that name,
``.../multirun/<time>`` the newest sweep, and a Python block's ``path`` a run of the icl task (the
block's last line is for icl runs).
``model=pretrained`` reads a tiny GPT-2 from a scratch Hugging Face cache (no download). Skipped,
each with its reason: ``make`` (a Makefile target is checked to exist), ``source``, and sweeps on Ray
or SLURM (a cluster). Bash blocks run first, in order, then Python blocks.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODULES = {"toylens-train": "toylens.train.cli", "toylens-analyze": "toylens.report.cli",
           "toylens-sweep-report": "toylens.sweep.cli", "toylens-sae": "toylens.report.sae_cli",
           "toylens-check-task": "toylens.data.check_cli"}
FILE = re.compile(r"^# file: (\S+)\n")  # a python block the reader saves as that file (a task, an analysis)
TINY_TRAIN = ["train.steps=4", "train.batch_size=8", "train.eval_size=16", "train.eval_every=2",
              "train.checkpoint_every=2", "train.log_every=2", "train.progress=false"]
TINY_ANALYZE = ["batch.size=24", "reference.size=24", "pairs.n=4", "tracing.prompts=2", "tracing.n_samples=1",
                "task_vectors.n=8", "progress=false"]
TINY_LLC = ["llc.num_chains=1", "llc.num_draws=16", "llc.n_rows=64"]  # over=checkpoints only (else refused)
TINY_SWEEP_REPORT = ["--batch-size", "24", "--reference-size", "24", "--quiet"]
TINY_SAE = ["d_sae=32", "steps=20", "batch_tokens=256", "eval_sequences=16", "cards=2", "log_every=5"]
SKIP = [(r"^hydra/launcher=(ray|slurm)$", "a Ray or SLURM sweep needs a cluster (tests/sweep runs the launchers)")]
TIMEOUT = 300


def blocks(text: str) -> list[tuple[str, str, int, str]]:
    """(language, body, line number, the ## heading above it) of every fenced bash/python block."""
    out = []
    for m in re.finditer(r"^```(bash|python)[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
        headings = re.findall(r"^## (.+)$", text[: m.start()], flags=re.M)
        out.append((m.group(1), m.group(2), text[: m.start()].count("\n") + 1, headings[-1] if headings else ""))
    return out


def commands(body: str) -> list[list[str]]:
    """A bash block's commands as argument lists: continuation lines joined, comments dropped."""
    out = []
    for line in body.replace("\\\n", " ").splitlines():
        line = re.sub(r"<([^<>'\"\n]+)>", lambda m: "<" + m.group(1).replace(" ", "_") + ">", line)  # one word
        args = shlex.split(line, comments=True)
        if args:
            out.append(args)
    return out


class Workspace:
    def __init__(self, cwd: Path, env: dict):
        self.cwd, self.env = cwd, env
        self.runs: list[Path] = []
        self.timings: list[tuple[str, float]] = []

    def fill(self, arg: str) -> str:
        """The argument with its placeholders filled from earlier commands."""
        m = re.fullmatch(r"(\S*?)(checkpoints/[\w.-]+/multirun)/<[^>]+>", arg)
        if m:
            sweeps = sorted((self.cwd / m.group(2)).iterdir())
            return m.group(1) + str(sweeps[-1])
        m = re.fullmatch(r"(\S*?)checkpoints/([\w.-]+)/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", arg)
        if m:
            named = [r for r in self.runs if r.parent.name == m.group(2)]
            return m.group(1) + str(named[-1])
        m = re.fullmatch(r"([\w.]+=)?<[^>]*(run_director|dir)[^>]*>", arg)
        if m:
            return (m.group(1) or "") + str(self.runs[-1])
        assert not re.search(r"<[\w.-]+>", arg), f"unknown placeholder in {arg!r}"
        return arg

    def run(self, args: list[str]) -> str | None:
        """Run one command; None when it ran, else why it was skipped. Fails the test on an error."""
        name = args[0]
        if name == "make":
            assert re.search(rf"^{re.escape(args[1])}:", (REPO / "Makefile").read_text(), flags=re.M), args
            return f"make {args[1]}: the target exists (running it would rebuild .venv / rerun this suite)"
        if name == "source":
            assert (Path(sys.prefix) / "bin" / "activate").exists()
            return "source: the tests already run inside the virtualenv"
        for pattern, why in SKIP:
            if any(re.match(pattern, a) for a in args):
                return why
        assert name in MODULES, f"the README runs {name!r}, which this test does not know"
        rest = [self.fill(a) for a in args[1:]]
        if name == "toylens-train":
            rest += ["train.steps=6"] if any(a.startswith("resume=") for a in rest) else TINY_TRAIN
        elif name == "toylens-analyze":
            rest += TINY_ANALYZE + (TINY_LLC if "over=checkpoints" in rest else [])
        elif name == "toylens-sae":
            rest += TINY_SAE
        elif name == "toylens-check-task":
            pass
        else:
            rest = TINY_SWEEP_REPORT + rest
        exe = BIN / name
        cmd = [str(exe), *rest] if exe.exists() else [sys.executable, "-m", MODULES[name], *rest]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=TIMEOUT)
        self.timings.append((shlex.join(args)[:70], round(time.perf_counter() - t0, 1)))
        assert p.returncode == 0, f"{shlex.join(args)}\n -> exit {p.returncode}\n{p.stderr[-3000:]}"
        if name == "toylens-train" and "-m" not in rest:
            self.runs.append((self.cwd / p.stdout.strip().splitlines()[-1]).resolve())
        elif name == "toylens-train":  # a sweep: its runs, in job order
            sweep = max(self.cwd.glob("checkpoints/*/multirun/*"), key=lambda d: d.stat().st_mtime)
            self.runs += sorted((d for d in sweep.iterdir() if (d / ".hydra").is_dir()), key=lambda d: int(d.name))
        return None

    def python(self, body: str) -> None:
        icl = [r for r in self.runs if (r / ".hydra").exists() and "name: icl" in (r / ".hydra" / "config.yaml")
               .read_text()]
        lines = [f"path = {str((icl or self.runs)[-1])!r}  # the reader's run directory"]
        for line in body.splitlines():
            lines.append(line)
            m = re.match(r"^(\s*)(\w+) = TrainConfig\(", line)
            if m:
                lines += [f"{m.group(1)}{m.group(2)}.{a.split('=')[0]} = {a.split('=')[1].capitalize()}"
                          if a.endswith("false") else f"{m.group(1)}{m.group(2)}.{a.replace('=', ' = ')}"
                          for a in TINY_TRAIN]
        p = subprocess.run([sys.executable, "-c", "\n".join(lines)], cwd=self.cwd, env=self.env,
                           capture_output=True, text=True, timeout=TIMEOUT)
        assert p.returncode == 0, f"{body}\n -> exit {p.returncode}\n{p.stderr[-3000:]}"


SWEEPS = "Sweeps"  # the README section whose commands tests/sweep covers (launchers, sweep report) faster


def test_extraction_finds_the_readmes_blocks():
    found = blocks((REPO / "README.md").read_text())
    assert {b[0] for b in found} == {"bash", "python"} and any(b[3] == SWEEPS for b in found)
    cmds = [c for lang, body, _, _ in found if lang == "bash" for c in commands(body)]
    assert ["toylens-train", "experiment=no_pos_prev_token"] in cmds
    joined = commands("toylens-analyze a=1 \\\n  'b=[\"x y\"]' run=<the run dir>  # note\n# only a comment\n")
    assert joined == [["toylens-analyze", "a=1", 'b=["x y"]', "run=<the_run_dir>"]]


def run_blocks(tmp_path: Path, which) -> list[str]:
    """Run the README blocks ``which(heading)`` selects (bash first, then python); returns the skip lines."""
    sys.path.insert(0, str(REPO / "tests" / "analyze" / "pretrained"))
    try:
        from conftest import add_to_hub_cache, build_tiny_gpt2  # the tiny GPT-2 the pretrained tests use
    finally:
        sys.path.pop(0)
    hf_home = add_to_hub_cache(tmp_path / "hf_home", build_tiny_gpt2(tmp_path / "tiny_gpt2"))
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    cwd = tmp_path / "work"
    cwd.mkdir()
    ws = Workspace(cwd, env)
    found = [b for b in blocks((REPO / "README.md").read_text()) if which(b[3])]
    skipped, failures = [], []
    for lang, body, _, _ in found:  # the files the reader saves first: the commands name them
        m = FILE.match(body)
        if lang == "python" and m:
            (cwd / m.group(1)).write_text(body)
    found = [b for b in found if not (b[0] == "python" and FILE.match(b[1]))]
    for lang, body, line, _ in [b for b in found if b[0] == "bash"] + [b for b in found if b[0] == "python"]:
        try:
            if lang == "python":
                ws.python(body)
                continue
            for args in commands(body):
                why = ws.run(args)
                if why:
                    skipped.append(f"README.md:{line}: {shlex.join(args)[:80]} -- {why}")
        except (AssertionError, subprocess.TimeoutExpired, IndexError, ValueError) as e:
            failures.append(f"README.md:{line} ({lang} block): {e}")
    print("\n".join(skipped + [f"{t:6.1f} s  {c}" for c, t in ws.timings]))
    assert not failures, "\n\n".join(failures)
    return skipped


def test_readme_commands_run_as_written(tmp_path):
    skipped = run_blocks(tmp_path, lambda heading: heading != SWEEPS)
    assert len(skipped) == 3, skipped  # make demo, make test (targets checked), source


@pytest.mark.slow
def test_readme_sweep_commands_run_as_written(tmp_path):
    """The Sweeps section (local and joblib sweeps, the sweep report, over=checkpoints); the launchers and
    the sweep report are covered faster by tests/sweep."""
    skipped = run_blocks(tmp_path, lambda heading: heading == SWEEPS)
    assert len(skipped) == 3, skipped  # the Ray and SLURM sweeps


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-s"]))
