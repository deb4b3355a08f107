"""The analysis report of a run: which analyses, on which batches, assembled into one page.

    from toylens.report import AnalyzeConfig, make_report
    run = toylens.load_run(path)
    make_report(run, AnalyzeConfig(run=str(path), analyses=["attention", "ablation"]))
    # -> <run>/report/index.html, report.json, ablation.csv, plotly.min.js

``build_report`` computes (``report.sections`` holds one builder per section), ``write_report``
(``report.html``) renders and writes atomically, ``log_report`` (``report.wandb_log``) logs to the
run's own wandb run. ``AnalyzeConfig`` is the schema of ``configs/analyze.yaml``; ``validate``
checks what types cannot, raising ``ConfigError`` with one line naming the field and the fix.
Heavy imports (torch, TransformerLens, plotly) happen inside functions, so the CLI rejects bad
input in about a second.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from toylens.report.config import ANALYSES, AnalyzeConfig, validate
from toylens.report.glance import highlights
from toylens.report.page import Figure, Report, View
from toylens.report.registry import BY_NAME, failed_section, resolve_all
from toylens.runs.config import ConfigError, resolve_device
from toylens.runs.run import Run, RunError


def build_report(run: Run, cfg: AnalyzeConfig, model=None) -> Report:
    """Run every analysis in ``cfg.analyses`` on the run's checkpoint and assemble the report.

    ``model``: an already loaded model of ``cfg.step`` (default: ``run.model(cfg.step)``).
    """
    from toylens.report import sections as rs

    validate(cfg)
    device = resolve_device(cfg.device)
    step = run.check_step(cfg.step)
    if model is None:
        model = run.model(step, device=device)
    ctx = rs.Context(run=run, cfg=cfg, model=model, step=step, device=device)
    specs = [BY_NAME["overview"], BY_NAME["training"], *resolve_all(list(cfg.analyses))]
    if cfg.over == "checkpoints":
        specs.append(BY_NAME["dynamics"])
    sections = run_builders(ctx, specs)
    ctx.data["highlights"] = highlights(ctx)
    report = Report(title=f"toylens report: {run.name}", run_name=run.name, data=ctx.data,
                    sections=sections, ablation=ctx.ablation, files=ctx.files)
    index_figures(report)
    return report


def run_builders(ctx, specs: list) -> list:
    """Each entry's section, in order (``specs``: ``registry.SectionSpec``s). An analysis that does not apply to the
    model is left out (``ctx.data["left_out"]``: its name and a one-line reason, listed in the page's contents); one
    that fails becomes a section holding its error (``ctx.data["errors"]``), and the rest still run."""
    from toylens.analyze.pairs import PairsError
    from toylens.runs.tokenizer import PromptError

    bad_input = (ConfigError, RunError, PairsError, PromptError)  # one line, exit 2, nothing written

    sections = []
    ctx.data.setdefault("left_out", [])
    ctx.data.setdefault("errors", [])
    t_start = time.perf_counter()
    for spec in specs:
        t0 = time.perf_counter()
        try:
            why = spec.applies(ctx)
        except bad_input:
            raise
        except Exception as e:
            why, section = None, failed_section(ctx, spec, e)
        else:
            section = None
        if why:
            ctx.data["left_out"].append({"analysis": spec.name, "reason": why})
            continue
        if section is None:
            if spec.listed:
                _say(ctx.cfg, f"{spec.name} ...")
            try:
                section = spec.build(ctx)
            except bad_input:  # the user's input, not the analysis, is wrong: say so instead of a report
                raise
            except Exception as e:  # one failed analysis must not lose the others (KeyboardInterrupt still stops)
                section = failed_section(ctx, spec, e)
                _say(ctx.cfg, f"{spec.name} failed: {ctx.data['errors'][-1]['error']}")
        sections.append(section)
        ctx.data["timings_s"][spec.name] = round(time.perf_counter() - t0, 3)
    ctx.data["timings_s"]["total"] = round(time.perf_counter() - t_start, 3)
    return sections


def index_figures(report: Report) -> None:
    """Give every figure and CircuitsVis view a unique page id and list them and the sections in ``report.data``."""
    used: set[str] = set()
    figures, views = [], []
    for section in report.sections:
        for block in section.blocks:
            if isinstance(block, Figure):
                block.id = _unique_id("fig-" + "".join(c if c.isalnum() else "-" for c in block.name), used)
                figures.append({"id": block.id, "name": block.name, "section": section.id,
                                "title": _title(block.fig)})
            elif isinstance(block, View):  # a CircuitsVis view: its own container id
                block.id = _unique_id("cv-" + "".join(c if c.isalnum() else "-" for c in block.name), used)
                views.append({"id": block.id, "name": block.name, "section": section.id, "component": block.component})
    report.data["figures"] = figures
    if views:
        report.data["views"] = views
    report.data["sections"] = [{"id": s.id, "title": s.title} for s in report.sections]


def _unique_id(base: str, used: set[str]) -> str:
    name, i = base, 1
    while name in used:
        name, i = f"{base}-{i}", i + 1
    used.add(name)
    return name


def _title(fig) -> str:
    title = fig.layout.title.text
    return title or ""


def _say(cfg: AnalyzeConfig, msg: str) -> None:
    if cfg.progress:
        print(f"toylens-analyze: {msg}", file=sys.stderr, flush=True)


def make_report(run: Run, cfg: AnalyzeConfig, model=None, wandb_id: str | None = None) -> Path:
    """Build, write ``<run>/report/`` atomically and (when the run used wandb) log it; returns index.html.

    ``wandb_id``: the run's wandb id (default: read from its last state file when it used wandb).
    """
    from toylens.report.html import write_report

    uses_wandb = cfg.wandb and run.config.logger.name == "wandb"
    if uses_wandb and wandb_id is None:
        wandb_id = run.wandb_id()  # read before anything is written: a bad state file fails here
    report = build_report(run, cfg, model=model)
    out, why = report_folder(run.path, cfg, report)
    index = write_report(report, out)
    if why:
        print(f"toylens-analyze: {why}", file=sys.stderr, flush=True)
    if uses_wandb:
        from toylens.report.wandb_log import log_report

        try:
            log_report(run, report, index.parent, wandb_id)
        except Exception as e:  # the report is written; wandb trouble must not lose it
            print(f"toylens-analyze: warning: wandb logging failed ({' '.join(str(e).split())[:200]}); "
                  f"the report is in {index.parent}", file=sys.stderr)
    check_strict(cfg, report.data, index)
    return index


def report_folder(run_dir: Path, cfg: AnalyzeConfig, report: Report) -> tuple[Path, str | None]:
    """``<run>/report``, unless the report there has sections this one lacks (an earlier, fuller report): then a side
    folder ``<run>/report-<analyses>`` named by the set of analyses asked for, and the line that says so. The same
    check guards the side folder: a partial report never replaces any report with sections it lacks."""
    base = run_dir / "report"
    lost = _lost_sections(base, report)
    if not lost:
        return base, None
    stem = run_dir / f"report-{_side_name(cfg)}"
    for n in range(1, 1000):  # the same analyses again replace their own side report; a fuller one is kept
        out = stem if n == 1 else stem.with_name(f"{stem.name}-{n}")
        if not _lost_sections(out, report):
            return out, f"{base} has sections this report lacks ({', '.join(lost)}); written to {out} instead"
    raise ConfigError(f"analyses={list(cfg.analyses)}: {stem}-2 .. -999 all hold fuller reports; move some away")


def _lost_sections(folder: Path, report: Report) -> list[str]:
    """The sections of the toylens report in ``folder`` that ``report`` lacks (none when there is no such report:
    a foreign folder is refused later by write_report, with one line)."""
    import json

    from toylens.report.folder import REPORT_MARKER

    try:
        old = {s["id"] for s in json.loads((folder / "report.json").read_text()).get("sections", [])}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return []
    if not (folder / REPORT_MARKER).is_file():
        return []
    return sorted(old - {s.id for s in report.sections})


def _side_name(cfg: AnalyzeConfig) -> str:
    """``all``, ``attention+dla`` (up to three), else ``attention+3-more-<hash>``: a short hash of the sorted names,
    so two different sets of analyses never share a folder."""
    import hashlib

    specs = resolve_all(list(cfg.analyses))
    names = [re.sub(r"[^A-Za-z0-9_-]", "-", s.name) for s in specs]
    if names == list(ANALYSES):
        return "all"
    if len(names) <= 3:
        return "+".join(names)
    keys = sorted(s.origin.ref if s.origin is not None else s.name for s in specs)  # a user's: its canonical ref
    digest = hashlib.sha256(",".join(keys).encode()).hexdigest()[:6]
    return f"{names[0]}+{len(names) - 1}-more-{digest}"


class AnalysisFailed(RuntimeError):
    """``strict=true`` and an analysis failed; the report (with the error in its section) is written."""


def check_strict(cfg: AnalyzeConfig, data: dict, index: Path) -> None:
    errors = data.get("errors", [])
    if cfg.strict and errors:
        first = errors[0]
        raise AnalysisFailed(f"{len(errors)} analysis(es) failed (strict=true), first {first['analysis']}: "
                             f"{first['error']}; the report is {index}")
