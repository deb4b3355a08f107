"""Where a run's task came from, recorded with the run so it rebuilds in a fresh process, from any directory.

A run of a built-in task records nothing more than its config. A run of the user's own task (``task=file.py:Class``,
``task=module:Class``, an installed plugin, or a class registered from the user's module) also writes

  task_source.json   the task's ``Origin`` (toylens.refs): canonical reference, kind, module, file, SHA-256,
                     the plugin's distribution, and the name its config carries
  task_source.py     a copy of the file the class was defined in, as it was when training started

``restore_task`` (called by ``load_run`` and ``resume=``) loads the class again from the recorded file or module, or
from ``task_source=<file>`` when given. A file that is gone is an error naming the saved copy; a file whose hash
changed is loaded with a warning giving both hashes.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

SOURCE_JSON = "task_source.json"
SOURCE_COPY = "task_source.py"


class TaskSourceError(ValueError):
    """The run's task cannot be loaded again; one line naming the file and how to point at it."""


class TaskSourceChanged(UserWarning):
    """The run's task file changed since the run started; it is used as it is now."""


def write_task_source(run_dir: Path, task) -> dict | None:
    """Record where ``task``'s class came from (nothing for a built-in); returns the record."""
    from toylens.data.registry import task_origin
    from toylens.refs import sha256_file
    from toylens.runs import checkpoint as ck

    origin = task_origin(type(task))
    if origin.kind == "builtin":
        return None
    record = {"toylens_task_source": 1, "name": task.cfg.name, **origin.to_dict(), "copy": None}
    path = Path(origin.path) if origin.path else None
    if path is not None and path.is_file() and origin.kind != "main":
        data = path.read_bytes()
        ck.atomic_write(Path(run_dir) / SOURCE_COPY, ck._write_bytes(data))
        record["copy"] = SOURCE_COPY
        if origin.sha256 and sha256_file(path) != origin.sha256:
            warnings.warn(f"{path} changed after it was imported; task_source.py holds the file as it is now",
                          TaskSourceChanged, stacklevel=2)
            record["sha256"] = sha256_file(path)
    ck.write_json(Path(run_dir) / SOURCE_JSON, record)
    return record


def read_task_source(run_dir: Path) -> dict | None:
    p = Path(run_dir) / SOURCE_JSON
    if not p.exists():
        return None
    try:
        record = json.loads(p.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("name"), str):
            raise ValueError("no task name")
    except (OSError, ValueError) as e:
        raise TaskSourceError(f"{p}: unreadable ({' '.join(str(e).split())[:120]}); restore the file toylens-train "
                              f"wrote") from None
    return record


def restore_task(run_dir: Path, task_source: str | Path | None = None) -> dict | None:
    """Load the run's own task class again and register it under the name its config carries (see the module's
    docstring); returns the record (None for a built-in task). ``task_source``: a .py file to load the class from
    instead (e.g. ``<run>/task_source.py``)."""
    from toylens.data.registry import remember
    from toylens.refs import Origin, RefError

    run_dir = Path(run_dir)
    record = read_task_source(run_dir)
    if record is None:
        if task_source is not None:
            raise TaskSourceError(f"task_source={task_source}: {run_dir} trained a built-in task; drop task_source")
        return None
    origin = Origin.from_dict(record)
    copy = run_dir / SOURCE_COPY
    point = (f"pass task_source={copy} (the copy saved with the run, sha256 {str(origin.sha256)[:12]})"
             if copy.is_file() else "pass task_source=<a .py file defining it>")
    load = _LOADERS.get("given" if task_source is not None else origin.kind, _from_main)
    try:
        cls, path = load(record["name"], origin, point, task_source)
    except RefError as e:
        raise TaskSourceError(f"{' '.join(str(e).split())}; {point}") from None
    if path is not None and path.is_file():
        _check_hash(path, origin.sha256, record["name"], copy)
    remember(cls, Origin(**{**origin.to_dict(), "ref": record["name"]}))
    return record


# One loader per kind of origin: (name, origin, how to point at a file, task_source) -> (class, its source file).
def _from_given(name, origin, point, task_source):
    from toylens.refs import load_file

    src = Path(task_source).expanduser().absolute()
    if not src.is_file():
        raise TaskSourceError(f"task_source={task_source}: no such file; {point}")
    return load_file(src, origin.attr or "", key="task_source", ref=f"{src}:{origin.attr}")[0], src


def _from_file(name, origin, point, task_source):
    from toylens.refs import load_file

    path = Path(origin.path or "")
    if not path.is_file():
        raise TaskSourceError(f"task {name}: the file {path} is gone; put it back or {point}")
    return load_file(path, origin.attr or "", key="task", ref=name)[0], path


def _from_module(name, origin, point, task_source):
    """The module by its name (the working directory is searched too), else its recorded file."""
    from toylens.refs import RefError, load_file, load_module_ref

    try:
        cls = load_module_ref(origin.module or "", origin.attr or "", key="task", ref=name)[0]
    except RefError as e:
        path = Path(origin.path or "")
        if not path.is_file():
            raise TaskSourceError(f"task {name}: the module {origin.module} cannot be imported here "
                                  f"({' '.join(str(e).split())[:160]}) and {path} is gone; install it or run from its "
                                  f"folder, or {point}") from None
        return load_file(path, origin.attr or "", key="task", ref=name, module_name=origin.module)[0], path
    return cls, Path(getattr(sys.modules.get(cls.__module__), "__file__", "") or "")


def _from_entry_point(name, origin, point, task_source):
    from toylens.data.registry import PLUGIN_GROUP, task_class
    from toylens.refs import entry_points

    if name not in entry_points(PLUGIN_GROUP):
        raise TaskSourceError(f"task {name}: the package {origin.dist} that provided it ({PLUGIN_GROUP} entry point "
                              f"{name} = {origin.module}:{origin.attr}) is not installed here; install it, or {point}")
    cls = task_class(name)
    return cls, Path(getattr(sys.modules.get(cls.__module__), "__file__", "") or "")


def _from_main(name, origin, point, task_source):  # a class defined in a notebook or a script's __main__
    raise TaskSourceError(f"task {name} was defined in __main__ (a notebook or script), which another process cannot "
                          f"import; pass task_source=<a .py file defining {origin.attr}>")


_LOADERS = {"given": _from_given, "file": _from_file, "module": _from_module, "entry_point": _from_entry_point,
            "main": _from_main}


def _check_hash(path: Path, recorded: str | None, name: str, copy: Path) -> None:
    from toylens.refs import sha256_file

    now = sha256_file(path)
    if recorded and now != recorded:
        _changed(path, recorded, now, name, copy)


_WARNED: set[tuple[str, str, str]] = set()  # (file, hash was, hash now) already warned about in this process


def _changed(path: Path, was: str, now: str, name: str, copy: Path) -> None:
    """Warn once per process: ``resume=`` restores the task more than once (the command line's check, then the
    training), and Python's own once-per-place filter is reset whenever anything changes the warning filters."""
    if (str(path), was, now) in _WARNED:
        return
    _WARNED.add((str(path), was, now))
    use = f"; pass task_source={copy} to use the run's own copy" if copy.is_file() else ""
    warnings.warn(f"task {name}: {path} changed since the run (sha256 was {was[:12]}, now {now[:12]}); using it as it "
                  f"is now{use}", TaskSourceChanged, stacklevel=3)
