"""The one task registry: built-in tasks, the user's tasks by reference and installed plugins, looked up the same way.

``task=<value>`` (CLI) and ``TrainConfig(task=<value>)`` (Python) accept:

- a registered name: the built-ins (``prev_token``, ``induction``, ...) and any class a user's module registered with
  ``@register_task``;
- an installed plugin: an entry point of the group ``toylens.tasks`` (``[project.entry-points."toylens.tasks"]
  parity = "parity_pkg:Parity"`` in the package's pyproject), then ``task=parity``;
- a reference: ``package.module:Class`` (importable; the working directory is searched too) or
  ``path/to/file.py:Class`` (relative to the working directory, or absolute);
- in Python also the ``Task`` subclass itself, an instance of it, or its config dataclass.

Every resolved class is remembered under its canonical name (a file reference with its absolute path), which is what
the task's config carries in ``name`` and what a run records (``toylens.runs.task_source``), so the run rebuilds its
task in a fresh process from any directory. Problems are ``TaskRefError``: one line naming ``task`` and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from collections.abc import Mapping
from typing import Any

from toylens.data.base import TASKS, Task, TaskConfig
from toylens.refs import Origin, RefError, canonical, entry_points, is_ref, load_entry_point, load_ref, origin_of

PLUGIN_GROUP = "toylens.tasks"
_RESOLVED: dict[str, tuple[type[Task], Origin]] = {}  # canonical name -> (class, where it came from)


class TaskRefError(ValueError):
    """A task name or reference that cannot be used; one line naming ``task`` and the fix."""


def plugin_names() -> list[str]:
    return sorted(entry_points(PLUGIN_GROUP))


def known_names() -> list[str]:
    """Every task a plain name selects: the registered ones and the installed plugins."""
    return sorted(set(TASKS) | set(plugin_names()))


def _check_class(obj: Any, key: str, ref: str) -> type[Task]:
    if not (isinstance(obj, type) and issubclass(obj, Task)):
        raise TaskRefError(f"{key}={ref}: {obj!r} is not a subclass of toylens.data.Task; point at your Task class")
    builtin = TASKS.get(obj.name)
    if builtin is not None and builtin is not obj and builtin.__module__.startswith("toylens."):
        raise TaskRefError(f"{key}={ref}: {obj.__name__}.name is {obj.name!r}, a built-in task's name (analyses "
                           f"and reports key on it); set name = \"my_{obj.name}\" on the class")
    cc = getattr(obj, "config_cls", None)
    if not (isinstance(cc, type) and dataclasses.is_dataclass(cc) and issubclass(cc, TaskConfig)):
        raise TaskRefError(f"{key}={ref}: {obj.__name__}.config_cls must be a @dataclass subclassing "
                           f"toylens.data.TaskConfig (its fields are the task.* settings)")
    return obj


def remember(cls: type[Task], origin: Origin) -> type[Task]:
    """Make ``origin.ref`` select ``cls`` in this process (a run's recorded task, restored from its source)."""
    _RESOLVED[origin.ref] = (cls, origin)
    return cls


def task_class(name: str, *, key: str = "task") -> type[Task]:
    """The Task class ``name`` selects (registered name, plugin, or reference); ``TaskRefError`` when none."""
    if not isinstance(name, str) or not name:
        raise TaskRefError(f"{key}={name!r}: give a task name or a reference module:Class / file.py:Class")
    if name in TASKS:
        return TASKS[name]
    hit = _RESOLVED.get(canonical(name))
    if hit is not None:
        return hit[0]
    try:
        if is_ref(name):
            obj, origin = load_ref(name, key=key)
        else:
            eps = entry_points(PLUGIN_GROUP)
            if name not in eps:
                names = known_names()
                near = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
                hint = f"did you mean {near[0]}? " if near else ""
                raise TaskRefError(f"{key}={name} is not a task; {hint}choose one of {', '.join(names)}, or give your "
                                   f"own as module:Class or path/to/file.py:Class")
            obj, origin = load_entry_point(eps[name], key=key)
    except RefError as e:
        raise TaskRefError(str(e)) from None
    return remember(_check_class(obj, key, name), origin)


def task_origin(cls: type[Task]) -> Origin:
    """Where ``cls`` came from: a built-in, a reference or plugin this registry loaded, or the module it lives in."""
    for c, origin in _RESOLVED.values():
        if c is cls:
            return origin
    if TASKS.get(cls.name) is cls and cls.__module__.startswith("toylens."):
        return Origin(ref=cls.name, kind="builtin", module=cls.__module__, attr=cls.__qualname__)
    origin = origin_of(cls)
    if cls.__module__ == "__main__":
        origin = dataclasses.replace(origin, kind="main", path=None, sha256=None)
    return origin


def config_name(cls: type[Task]) -> str:
    """The name a config of ``cls`` carries: its registered name, else its canonical reference."""
    if TASKS.get(cls.name) is cls:
        return cls.name
    origin = task_origin(cls)
    remember(cls, origin)
    return origin.ref


def task_config(value: Any, *, key: str = "task") -> TaskConfig:
    """The typed config of a task given as a name/reference (its defaults), a Task subclass or instance, a config
    dataclass, or a mapping with ``name`` and settings (a composed Hydra node)."""
    if isinstance(value, TaskConfig):
        cls = class_of_config(value, key=key)
        return dataclasses.replace(value, name=config_name(cls))
    if isinstance(value, Task):
        return dataclasses.replace(value.cfg, name=config_name(type(value)))
    if isinstance(value, type):
        cls = _check_class(value, key, getattr(value, "__name__", repr(value)))
        return cls.config_cls(name=config_name(cls))
    if isinstance(value, str):
        cls = task_class(value, key=key)
        return cls.config_cls(name=value if value in TASKS else _canonical_of(cls, value))
    if isinstance(value, Mapping) or hasattr(value, "items"):
        from omegaconf import OmegaConf

        d = dict(value.items())
        name = d.get("name")
        if not isinstance(name, str):
            raise TaskRefError(f"{key}.name is missing; choose a task (task=<name> or task=module:Class)")
        cls = task_class(name, key=key)
        try:
            merged = OmegaConf.merge(OmegaConf.structured(cls.config_cls()), d)
            cfg = OmegaConf.to_object(merged)
        except Exception as e:  # omegaconf's messages are several lines: the problem, then "full_key: ..."
            lines = str(e).splitlines()
            field = next((ln.split(":", 1)[1].strip() for ln in lines if ln.strip().startswith("full_key:")), "")
            where = f"{key}.{field}={d.get(field)!r}" if field in d else f"{key} ({name})"
            from toylens._cli import expected_type

            wanted = expected_type(lines[0])
            if wanted and field in d:
                example = getattr(cls.config_cls(), field, None)
                raise TaskRefError(f"{where}: expected {wanted} (e.g. {key}.{field}={_yaml(example)})") from None
            raise TaskRefError(f"{where}: {' '.join(lines[0].split())}") from None
        return dataclasses.replace(cfg, name=name if name in TASKS else _canonical_of(cls, name))
    raise TaskRefError(f"{key}={value!r}: give a task name, a reference module:Class / file.py:Class, a Task "
                       f"subclass or its config")


def _yaml(value: Any) -> str:
    """A default as it is written on the command line (``true``, ``null``, ``9``)."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def class_of_config(value: TaskConfig, *, key: str = "task") -> type[Task]:
    """The Task class whose ``config_cls`` is ``type(value)``. Matched by the config's type, not its ``name``: a
    config's ``name`` is only a default (``"majority"``), and an installed plugin or another file may use the same
    one for an unrelated class. ``name`` only picks among several classes sharing the config type."""
    ctype = type(value)
    if ctype is TaskConfig:  # the shared default of tasks without settings: only the name tells them apart
        return task_class(value.name, key=key)
    by_name = [TASKS.get(value.name), (_RESOLVED.get(canonical(value.name)) or (None,))[0]]
    for cls in by_name:  # the class this config was made for (a round trip: its name is the canonical reference)
        if cls is not None and cls.config_cls is ctype:
            return cls
    found = _classes_using(ctype) or _named_class(value, key)
    for narrower in (lambda c: c.__dict__.get("config_cls") is ctype,  # declares it (a subclass only inherits it)
                     lambda c: c.name == value.name):
        if len(found) > 1 and sum(map(narrower, found)) == 1:
            found = [c for c in found if narrower(c)]
    if len(found) == 1:
        return _check_class(found[0], key, f"{ctype.__name__}(...)")
    what = f"{key}={ctype.__name__}(...)"
    if found:
        names = ", ".join(c.__qualname__ for c in found)
        raise TaskRefError(f"{what}: {names} all use {ctype.__name__}; pass the class itself ({key}="
                           f"{found[0].__qualname__}) or its reference file.py:{found[0].__qualname__}")
    raise TaskRefError(f"{what}: no Task subclass with config_cls = {ctype.__name__} is defined in "
                       f"{ctype.__module__} or loaded; pass the Task class itself, or its reference module:Class / "
                       f"file.py:Class")


def _named_class(value: TaskConfig, key: str) -> list[type[Task]]:
    """The class ``value.name`` selects (a reference not loaded yet, e.g. a run's recorded file), when its config
    type is ``value``'s; else none (a plugin of the same name with another config is not this task)."""
    try:
        cls = task_class(value.name, key=key)
    except TaskRefError:
        return []
    return [cls] if cls.config_cls is type(value) else []


def _classes_using(ctype: type) -> list[type[Task]]:
    """Every loaded Task class (registered, resolved, or defined in the config's own module) whose config_cls is
    ``ctype``, without duplicates."""
    module = sys.modules.get(ctype.__module__)
    in_module = [v for v in (vars(module).values() if module else ())
                 if isinstance(v, type) and issubclass(v, Task) and v is not Task]
    loaded = [*TASKS.values(), *(c for c, _ in _RESOLVED.values()), *in_module]
    return list(dict.fromkeys(c for c in loaded if c.config_cls is ctype))


def _canonical_of(cls: type[Task], given: str) -> str:
    hit = _RESOLVED.get(canonical(given))
    return hit[1].ref if hit is not None and hit[0] is cls else config_name(cls)


def make_task(cfg: TaskConfig) -> Task:
    """The task a config describes (its class found through the registry); the task checks its own settings."""
    return task_class(cfg.name)(cfg)
