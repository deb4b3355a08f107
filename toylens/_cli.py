"""The command-line edge shared by toylens-train and toylens-analyze: compose the config once before
Hydra runs, so a bad override is one line and exit 2 (never Hydra's multi-line report, never a
``*_schema`` entry shown as an option, never a ``+key`` suggestion), and ``--help`` from the schemas.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import sys
from pathlib import Path
from typing import Any

_HELP_FLAGS = {"--help", "-h"}
_SKIP_FLAGS = {"--hydra-help", "--cfg", "-c", "--info", "--shell-completion", "-sc", "--resolve", "--package",
               "-p", "--version", "--run", "-r"}
_MULTIRUN_FLAGS = {"--multirun", "-m"}


class UsageError(ValueError):
    """A command line that cannot work; the message is one line naming the override and the fix."""


def one_line_warnings(prog: str) -> None:
    """toylens's own warnings (a task file changed since the run, ...) as one line on stderr: ``prog: warning: ...``."""
    import warnings

    pkg = str(Path(__file__).resolve().parent)
    plain = warnings.formatwarning

    def fmt(message, category, filename, lineno, line=None):
        if str(Path(filename).resolve()).startswith(pkg):
            return f"{prog}: warning: {' '.join(str(message).split())}\n"
        return plain(message, category, filename, lineno, line)

    warnings.formatwarning = fmt


def fail(prog: str, msg: str, code: int = 2) -> None:
    print(f"{prog}: error: {' '.join(str(msg).split())}", file=sys.stderr)
    sys.exit(code)


def is_multirun(argv: list[str]) -> bool:
    return any(a in _MULTIRUN_FLAGS for a in argv)


def overrides_of(argv: list[str]) -> list[str] | None:
    """The ``key=value`` overrides to check; for a multirun, the first job's (each sweep's first value).
    None when Hydra should handle the line itself (--cfg, --hydra-help, ...)."""
    if any(a.split("=", 1)[0] in _SKIP_FLAGS for a in argv):
        return None
    overrides = [a for a in argv if not a.startswith("-")]
    if not is_multirun(argv):
        return overrides
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:
        return overrides  # compose() names the override it cannot parse
    return [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override()
            else o.input_line for o in parsed]


def _options(config_dir: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml"))


def compose(config_dir: Path, config_name: str, overrides: list[str]):
    """Compose like Hydra does (including ``hydra.*`` overrides); raises UsageError (one line)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import MissingConfigException, OverrideParseException

    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    except MissingConfigException as e:
        m = re.search(r"Could not find '([^']+)/([^']+)'", str(e))
        if m:
            group, name = m.groups()
            opts = [o for o in _options(config_dir, group) if not o.endswith("_schema")]
            if opts:
                raise UsageError(f"{group}={name} is not an option; choose one of {', '.join(opts)}") from None
        raise UsageError(str(e).splitlines()[0]) from None
    except OverrideParseException as e:
        bad = next((o for o in overrides if _unparsable(o)), "?")
        raise UsageError(f"cannot parse the override {bad!r} ({str(e).splitlines()[0]}); quote lists like "
                         f"'key=[a,b]'") from None
    except Exception as e:  # ConfigCompositionException and friends: rewrite the known shapes
        raise UsageError(_composition_message(e, config_dir, config_name, overrides)) from None


def _unparsable(override: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        OverridesParser.create().parse_overrides([override])
        return False
    except Exception:
        return True


def _composition_message(e: Exception, config_dir: Path, config_name: str, overrides: list[str]) -> str:
    text, cause = str(e), str(e.__cause__ or "")
    m = re.search(r"Could not override '([^']+)'", text)
    if m:
        key = m.group(1)
        rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key]
        return unknown_key_message(key, _keys_near(config_dir, config_name, rest, key))
    m = re.search(r"Error merging override (\S+)", text)
    if m and cause:
        return _merge_message(m.group(1), cause.splitlines()[0], config_dir, config_name, overrides)
    first = (cause or text).splitlines()[0] if (cause or text) else type(e).__name__
    return f"{first} (from the overrides {' '.join(overrides)})"


_TYPES = {"Integer": "an int", "Float": "a number", "bool": "true or false"}


def expected_type(omegaconf_error: str) -> str | None:
    """What type omegaconf wanted, in words (``an int``), from its first error line; None for another error."""
    for word, wanted in _TYPES.items():
        if f"converted to {word}" in omegaconf_error or f"not a valid {word}" in omegaconf_error:
            return wanted
    return None


def _merge_message(override: str, problem: str, config_dir: Path, config_name: str, overrides: list[str]) -> str:
    """``task.n_bits='abc': expected an int (e.g. task.n_bits=9)``: the wrong type in words, with the default as the
    example (composed from the other overrides); omegaconf's own first line for other problems."""
    from omegaconf import OmegaConf

    key, _, value = override.partition("=")
    key = key.lstrip("+~")
    wanted = expected_type(problem)
    if wanted is None:
        return f"{override}: {problem}"
    rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key]
    try:
        default = OmegaConf.select(compose(config_dir, config_name, rest), key, default=None)
    except UsageError:
        default = None
    example = f" (e.g. {key}={str(default).lower() if isinstance(default, bool) else default})" \
        if default is not None else ""
    return f"{key}={value!r}: expected {wanted}{example}"


def _keys_near(config_dir: Path, config_name: str, overrides: list[str], key: str) -> list[str]:
    """Dotted keys of the config composed from the other overrides, under ``key``'s parent."""
    from omegaconf import OmegaConf

    try:
        cfg = compose(config_dir, config_name, overrides)
    except UsageError:
        return []
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if node is None or not hasattr(node, "keys"):
        return []
    return [f"{parent}.{k}" if parent else str(k) for k in node.keys() if k != "hydra"]


def unknown_key_message(key: str, known: list[str]) -> str:
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean {near[0]}?" if near else "see --help for the settings"
    return f"{key} is not a setting; {hint}"


def leaves(d: Any, prefix: str = "") -> set[str]:
    if not isinstance(d, dict):
        return {prefix.rstrip(".")} if prefix else set()
    out: set[str] = set()
    for k, v in d.items():
        out |= leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}"}
    return out


def check_no_unknown_keys(dcfg, obj, overrides: list[str]) -> None:
    """Keys added with ``+``/``++`` that no schema field reads are errors, not silently dropped."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(dcfg, resolve=False)
    raw.pop("hydra", None)
    known = leaves(dataclasses.asdict(obj))
    extra = sorted(k for k in leaves(raw) if k not in known and not any(k.startswith(p + ".") for p in known))
    if extra:
        key = extra[0]
        given = next((o.split("=", 1)[0] for o in overrides if o.split("=", 1)[0].lstrip("+") == key), key)
        raise UsageError(f"{given}: " + unknown_key_message(key, sorted(known)))


def missing_message(e: Exception) -> str:
    """omegaconf's MissingMandatoryValue as one line: the key, that it has no default, and the fix (its comment in the
    schema says what it holds)."""
    key = getattr(e, "full_key", None) or "?"
    obj = getattr(e, "object_type", None)
    note = field_comments(obj).get(key.rsplit(".", 1)[-1], "") if isinstance(obj, type) else ""
    return f"{key}=???: a value is required (there is no default); add {key}=<value>" + (f" ({note})" if note else "")


# --- --help -------------------------------------------------------------------------------------
MISSING_SHOWN = "<required>"


def show_missing(dcfg) -> None:
    """Put ``<required>`` where a composed config has no value (``???``), so --help can list it (omegaconf refuses to
    build a config with a missing value)."""
    from omegaconf import OmegaConf

    for key in OmegaConf.missing_keys(dcfg):
        try:
            OmegaConf.update(dcfg, key, MISSING_SHOWN)
        except Exception:  # a non-string field: shown as null instead
            OmegaConf.update(dcfg, key, None)


def field_comments(cls: type) -> dict[str, str]:
    """``name -> the comment after it`` in a dataclass's source (the schema's own one-line docs)."""
    out = {}
    for c in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(c):
            continue
        try:
            src = inspect.getsource(c)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+):[^\n#]*#\s*(.+)$", src, re.M):
            out[m.group(1)] = m.group(2).strip()
    return out


def settings_lines(obj: Any, prefix: str = "", width: int = 28) -> list[str]:
    """One line per field of a (nested) dataclass instance: key, default, comment."""
    lines = []
    comments = field_comments(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            lines += settings_lines(value, key + ".", width)
            continue
        shown = "null" if value is None else value
        note = comments.get(f.name, "")
        lines.append(f"  {key + '=' + str(shown):<{width}} {note}".rstrip())
    return lines


def groups_lines(config_dir: Path, groups: list[str]) -> list[str]:
    lines = []
    for g in groups:
        opts = [o for o in _options(config_dir, g) if not o.endswith("_schema")]
        if opts:
            lines.append(f"  {g + '=':<16} {', '.join(opts)}")
    return lines
