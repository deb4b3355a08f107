"""References to the user's own code: ``package.module:Name``, ``path/to/file.py:Name`` (relative to the working
directory, or absolute) and installed packages' entry points (``[project.entry-points."toylens.tasks"]``).

The task registry (``toylens.data.registry``) and the report's section registry load the user's tasks and
analyses through this one module, and record where each came from (``Origin``: the canonical reference, the
source file, its SHA-256, the distribution of an entry point), so a run or a report can find it again in a fresh
process, from another directory. Every problem is a ``RefError`` of one line naming the setting and the fix.
Imports nothing of toylens.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


class RefError(ValueError):
    """A reference that cannot be loaded; the message is one line naming the setting and the fix."""


@dataclass(frozen=True)
class Origin:
    """Where a task or analysis came from.

    ``ref``: the canonical reference (``pkg.mod:Name``, ``/abs/path/file.py:Name``, or the entry point's or
    built-in's name); ``kind``: builtin | module | file | entry_point; ``path``: its source file (absolute),
    ``sha256``: that file's hash when loaded; ``module``/``attr``: what to import; ``dist``: ``name==version`` of an
    entry point's distribution."""

    ref: str
    kind: str
    module: str | None = None
    attr: str | None = None
    path: str | None = None
    sha256: str | None = None
    dist: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Origin:
        known = {k: d.get(k) for k in cls.__dataclass_fields__}
        if not isinstance(known.get("ref"), str) or not isinstance(known.get("kind"), str):
            raise RefError("the recorded origin has no ref/kind; restore the file toylens wrote")
        return cls(**known)


def is_ref(text: str) -> bool:
    """``module:Name`` or ``file.py:Name`` (a plain name is a built-in or an entry point)."""
    return isinstance(text, str) and ":" in text


def is_file_ref(text: str) -> bool:
    return is_ref(text) and text.rsplit(":", 1)[0].endswith(".py")


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def canonical(ref: str, base: str | Path | None = None) -> str:
    """A file reference with its path made absolute (against ``base``, default the working directory);
    module references and names unchanged."""
    if not is_file_ref(ref):
        return ref
    path, attr = ref.rsplit(":", 1)
    full = Path(path).expanduser()
    if not full.is_absolute():
        full = Path(base or os.getcwd()) / full
    return f"{os.path.normpath(full)}:{attr}"


def _getattr_path(obj: Any, attr: str, where: str, key: str, ref: str) -> Any:
    for part in attr.split("."):
        if not hasattr(obj, part):
            first, rest = _ranked(obj, key)
            names = first + rest
            near = difflib.get_close_matches(part, first, n=1, cutoff=0.6) or \
                difflib.get_close_matches(part, names, n=1, cutoff=0.6)
            hint = f"did you mean {near[0]}? " if near else ""
            listed = ", ".join(names[:12]) or "nothing"
            raise RefError(f"{key}={ref}: {where} has no {part!r}; {hint}it defines {listed}"
                           + (" ..." if len(names) > 12 else ""))
        obj = getattr(obj, part)
    return obj


def _ranked(obj: Any, key: str) -> tuple[list[str], list[str]]:
    """The public names of ``obj``: what ``key`` asks for (a task's Task subclasses for ``task=``, functions and
    classes for ``analyses=``), and the rest; each sorted."""
    names = sorted(n for n in dir(obj) if not n.startswith("_"))
    wanted = _is_task_class if key.split(".")[0] in ("task", "task_source") else callable
    first = [n for n in names if wanted(getattr(obj, n, None)) and not isinstance(getattr(obj, n, None), type(sys))]
    return first, [n for n in names if n not in first]


def _is_task_class(v: Any) -> bool:
    """A subclass of toylens.data.Task, told by its bases' names (this module imports nothing of toylens)."""
    return isinstance(v, type) and any((b.__module__, b.__qualname__) == ("toylens.data.base", "Task")
                                       for b in v.__mro__[1:])


def _one_line(e: BaseException, limit: int = 220) -> str:
    text = " ".join(str(e).split()) or "(no message)"
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}"


def file_module_name(path: str | Path) -> str:
    """The ``sys.modules`` name a file is loaded under: stable for one path, distinct for two files."""
    p = os.path.normpath(Path(path).absolute())
    stem = "".join(c if c.isalnum() else "_" for c in Path(p).stem)
    return f"toylens_user_{stem}_{hashlib.sha256(p.encode()).hexdigest()[:10]}"


def load_file(path: str | Path, attr: str, *, key: str, ref: str, module_name: str | None = None) -> tuple[Any, Origin]:
    """``attr`` of the Python file ``path`` (absolute). The file's folder is put on ``sys.path`` (after the rest)
    so it can import its siblings. Loading the same unchanged file twice returns the same objects."""
    p = Path(os.path.normpath(Path(path).absolute()))
    if not p.is_file():
        raise RefError(f"{key}={ref}: no such file {p}; give a path relative to {os.getcwd()} or an absolute one")
    sha = sha256_file(p)
    name = module_name or file_module_name(p)
    mod = sys.modules.get(name)
    if mod is None or getattr(mod, "__toylens_sha256__", None) != sha:
        spec = importlib.util.spec_from_file_location(name, p)
        if spec is None or spec.loader is None:
            raise RefError(f"{key}={ref}: {p} cannot be imported as Python; give a .py file")
        mod = importlib.util.module_from_spec(spec)
        mod.__toylens_sha256__ = sha
        if str(p.parent) not in sys.path:
            sys.path.append(str(p.parent))
        sys.modules[name] = mod  # before exec: dataclasses and pickling look the module up by name
        try:
            spec.loader.exec_module(mod)
        except Exception as e:
            del sys.modules[name]
            raise RefError(f"{key}={ref}: importing {p} failed ({_one_line(e)}); fix the file") from None
    obj = _getattr_path(mod, attr, str(p), key, ref)
    return obj, Origin(ref=f"{p}:{attr}", kind="file", module=name, attr=attr, path=str(p), sha256=sha)


def load_module_ref(module: str, attr: str, *, key: str, ref: str) -> tuple[Any, Origin]:
    """``attr`` of an importable module; the working directory is importable too (as with ``python -m``)."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if added:
            sys.path.remove(cwd)
        missing = e.name or module
        raise RefError(f"{key}={ref}: no module named {missing!r} (searched {cwd} and the installed packages); "
                       f"install it, run from its folder, or give its file: path/to/file.py:{attr}") from None
    except Exception as e:
        raise RefError(f"{key}={ref}: importing {module} failed ({_one_line(e)}); fix the module") from None
    obj = _getattr_path(mod, attr, f"module {module}", key, ref)
    path = getattr(mod, "__file__", None)
    sha = sha256_file(path) if path and Path(path).is_file() else None
    return obj, Origin(ref=f"{module}:{attr}", kind="module", module=module, attr=attr,
                       path=str(Path(path).resolve()) if path else None, sha256=sha)


def load_ref(ref: str, *, key: str, base: str | Path | None = None) -> tuple[Any, Origin]:
    """The object a ``module:Name`` or ``file.py:Name`` reference names, and its ``Origin``. ``key``: the setting
    that holds the reference, for messages (``task``, ``analyses``)."""
    if not is_ref(ref):
        raise RefError(f"{key}={ref}: not a reference; write package.module:Name or path/to/file.py:Name")
    target, attr = ref.rsplit(":", 1)
    if not target or not attr or not all(p.isidentifier() for p in attr.split(".")):
        raise RefError(f"{key}={ref}: write package.module:Name or path/to/file.py:Name (Name: a Python name)")
    if target.endswith(".py"):
        path = canonical(ref, base).rsplit(":", 1)[0]
        return load_file(path, attr, key=key, ref=ref)
    if not all(p.isidentifier() for p in target.split(".")):
        raise RefError(f"{key}={ref}: {target!r} is neither a module name nor a .py file")
    return load_module_ref(target, attr, key=key, ref=ref)


# --- entry points ---------------------------------------------------------------------------------
def entry_points(group: str) -> dict[str, Any]:
    """Installed entry points of ``group`` by name (``importlib.metadata``), first distribution wins."""
    from importlib.metadata import entry_points as eps

    out: dict[str, Any] = {}
    for ep in eps(group=group):
        out.setdefault(ep.name, ep)
    return out


def load_entry_point(ep: Any, *, key: str) -> tuple[Any, Origin]:
    try:
        obj = ep.load()
    except Exception as e:
        dist = getattr(getattr(ep, "dist", None), "name", "?")
        raise RefError(f"{key}={ep.name}: the entry point {ep.value} of package {dist} failed to load "
                       f"({_one_line(e)}); reinstall or fix that package") from None
    module, _, attr = ep.value.partition(":")
    mod = sys.modules.get(module.strip())
    path = getattr(mod, "__file__", None)
    dist = getattr(ep, "dist", None)
    return obj, Origin(ref=ep.name, kind="entry_point", module=module.strip(), attr=attr.strip() or None,
                       path=str(Path(path).resolve()) if path else None,
                       sha256=sha256_file(path) if path and Path(path).is_file() else None,
                       dist=f"{dist.name}=={dist.version}" if dist is not None else None)


def origin_of(obj: Any, kind: str = "module") -> Origin:
    """The ``Origin`` of a class or function already imported (e.g. a task registered with ``@register_task`` in a
    module the user imported): its module and qualified name, and the module's file and hash."""
    module = getattr(obj, "__module__", None) or "__main__"
    attr = getattr(obj, "__qualname__", getattr(obj, "__name__", "?"))
    mod = sys.modules.get(module)
    path = getattr(mod, "__file__", None)
    file_sha = getattr(mod, "__toylens_sha256__", None)
    if file_sha is not None and path:  # loaded by load_file: a file reference
        return Origin(ref=f"{Path(path).resolve()}:{attr}", kind="file", module=module, attr=attr,
                      path=str(Path(path).resolve()), sha256=file_sha)
    return Origin(ref=f"{module}:{attr}", kind=kind, module=module, attr=attr,
                  path=str(Path(path).resolve()) if path else None,
                  sha256=sha256_file(path) if path and Path(path).is_file() else None)
