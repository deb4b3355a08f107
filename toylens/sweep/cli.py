"""``toylens-sweep-report <sweep dir>``: the report across a sweep's runs.

Writes ``<sweep>/sweep_report/{index.html, report.json, ablation.csv, plotly.min.js}`` and prints the
path of index.html. Runs without an analysis report get one first (``toylens-analyze``'s
``make_report`` into ``<run>/report/``). Bad input exits with status 2 and one line on stderr naming
the argument and the fix; an unreadable run exits with status 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from toylens.sweep.report import RUN_ANALYSES, SweepReportConfig


def parser() -> argparse.ArgumentParser:
    d = SweepReportConfig()
    p = argparse.ArgumentParser(prog="toylens-sweep-report", description=__doc__.splitlines()[0])
    p.add_argument("sweep_dir", help="the sweep directory toylens-train -m printed (it holds sweep.json)")
    p.add_argument("--analyses", default=",".join(RUN_ANALYSES),
                   help=f"analyses each run's report needs, comma-separated (default: {','.join(RUN_ANALYSES)})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="rows analysed per run (batch.size)")
    p.add_argument("--reference-size", type=int, default=d.reference_size, help="ablation reference rows")
    p.add_argument("--chunk-size", type=int, default=d.chunk_size, help="rows per forward pass")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--top-k", type=int, default=d.top_k, help="hooks per run counted by the consistency score")
    p.add_argument("--recompute", action="store_true", help="recompute every run's analysis")
    p.add_argument("--no-wandb", action="store_true", help="do not log to wandb even when the runs did")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def _fail(msg: str, code: int) -> None:
    print(f"toylens-sweep-report: error: {msg}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from toylens.runs.checkpoint import CheckpointError
    from toylens.runs.config import ConfigError
    from toylens.runs.run import RunError
    from toylens.sweep import index as ix
    from toylens.sweep.report import make_sweep_report

    sweep = Path(args.sweep_dir).expanduser()
    if not sweep.is_dir():
        _fail(f"{sweep}: no such directory; pass the sweep directory toylens-train -m printed", 2)
    if not (sweep / "multirun.yaml").is_file() and not (sweep / ix.INDEX).is_file():
        _fail(f"{sweep}: not a sweep directory (no multirun.yaml or {ix.INDEX}); pass the directory "
              f"toylens-train -m printed (checkpoints/<name>/multirun/<time>)", 2)
    cfg = SweepReportConfig(analyses=[a for a in args.analyses.split(",") if a], batch_size=args.batch_size,
                            reference_size=args.reference_size, chunk_size=args.chunk_size, device=args.device,
                            top_k=args.top_k, recompute=args.recompute, progress=not args.quiet,
                            wandb=not args.no_wandb)
    try:
        from toylens.sweep.report import validate

        validate(cfg)
        index = make_sweep_report(sweep, cfg)
    except ConfigError as e:
        _fail(str(e), 2)
    except (RunError, CheckpointError) as e:
        _fail(ix.one_line(e), 1)
    print(f"toylens-sweep-report: {ix.summary_line(ix.read_index(sweep))}", file=sys.stderr)
    print(index)


if __name__ == "__main__":
    main()
