"""The report folder's safety: only a folder toylens wrote (it holds the ``.toylens-report`` marker) is ever
replaced, one writer at a time, by two renames under a lock; a destination that is not such a folder is refused with
one line before any work. Used by the run report (``html.write_report``), toylens-analyze's checks and the sweep
report."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

from toylens.runs.config import ConfigError

PLOTLY_JS = "plotly.min.js"
REPORT_MARKER = ".toylens-report"
_LEGACY_FILES = {"index.html", "report.json", "ablation.csv", PLOTLY_JS}  # a report from before the marker


class ReportPathError(ConfigError):
    """The report folder would replace something toylens did not write; one line naming the path."""


def is_toylens_report(path: Path) -> bool:
    """True for a folder toylens wrote as a report: it holds the marker (or, from before the marker,
    exactly a report's files)."""
    if not path.is_dir() or path.is_symlink():
        return False
    if (path / REPORT_MARKER).is_file():
        return True
    names = {p.name for p in path.iterdir()}
    return {"index.html", "report.json", PLOTLY_JS} <= names <= _LEGACY_FILES


def check_report_dir(out_dir: str | os.PathLike, field: str | None = None) -> Path:
    """Refuse (ReportPathError) a report destination that exists and is not a toylens report, or whose
    parent cannot be written; call it before the analyses run. Creates nothing."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink() or (out_dir.exists() and not is_toylens_report(out_dir)):
        kind = "a file" if out_dir.is_file() else "a folder toylens did not write"
        raise ReportPathError(f"{field + '=' if field else ''}{out_dir} is {kind}; a report only replaces a "
                              f"report toylens wrote, so choose {'a new ' + field if field else 'another place'} "
                              f"or move that one away")
    base = next(p for p in (out_dir.parent, *out_dir.parent.parents) if p.exists())
    try:
        Path(tempfile.mkdtemp(dir=base, prefix=".toylens-check-")).rmdir()
    except OSError as e:
        raise ReportPathError(f"{field + '=' if field else ''}{out_dir}: cannot write in {base} ({e.strerror}); "
                              f"choose a writable {field or 'place'}") from None
    return out_dir


def swap_in(new: Path, final: Path, field: str | None = None) -> None:
    """Replace ``final`` by ``new`` (which gets the report marker): two renames under an exclusive lock on
    the parent folder, so concurrent writers take turns; if the second rename fails the old folder is
    put back. Refuses (ReportPathError) to replace anything that is not a toylens report."""
    import fcntl

    (new / REPORT_MARKER).write_text("written by toylens; this folder is replaced when the report is rewritten\n")
    os.chmod(new / REPORT_MARKER, 0o644)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd is closed (or the process dies)
        check_report_dir(final, field)
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(final, old)
        try:
            os.replace(new, final)
        except BaseException:
            if old is not None:
                os.replace(old, final)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        os.close(fd)
