"""The one list of report sections: every built-in section and every analysis of the user's, by the same contract.

An entry (``SectionSpec``) has a name (what ``analyses=[...]`` and report.json use), a title, ``applies(ctx)`` (None
when it applies, else the one-line reason it is left out), ``build(ctx) -> Section`` and, for a pretrained model's
report, the reason it is left out there (None: it applies). ``toylens-analyze`` runs ``resolve_all(cfg.analyses)``
in page order: the built-ins in ``BUILTINS``' order, then the user's analyses in the order given.

The user's own analysis is a function (``analyses=[my_pkg.probe:run]``, ``analyses=[probe.py:probe]``, or a name
an installed package declares under the entry-point group ``toylens.analyses``)::

    def probe(model, run, batch) -> dict | AnalysisOutput:
        '''The section's title (the docstring's first line; default: the function's name)'''

``model``: the run's HookedTransformer at the analysed step (as trained, eval mode, on the analysis device; the call
runs under ``torch.no_grad()``: use ``torch.enable_grad()`` inside for gradients);
``run``: the ``toylens.runs.run.Run`` (config, task, metrics, ``run.model(step, folded=True)``; None in a
pretrained model's report); ``batch``: the evaluation ``Batch`` every section uses. It returns JSON-able results
(tensors and arrays are converted), or ``AnalysisOutput(results, figures={name: plotly figure}, text="...")``. The
results land in report.json under the function's name (where it came from, with its file's SHA-256, in
``report.json["origins"]``), scalars as the section's table, figures and text on the page, its time in
``timings_s``; an exception is that section's error, as for a built-in (``strict=true`` exits 1). A function may
carry ``applies(run) -> str | None`` (``probe.applies = lambda run: None if ... else "why not"``). Over checkpoints
(``dynamics.analyses=[probe.py:probe]``) it runs on each checkpoint's model and its scalars are plotted against the
step. Details: docs/analyses.md, "Your own analysis".
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from toylens.refs import Origin, RefError, entry_points, is_ref, load_entry_point, load_ref
from toylens.runs.config import ConfigError

PLUGIN_GROUP = "toylens.analyses"


@dataclass
class AnalysisOutput:
    """What a user's analysis may return instead of a plain dict: results plus plotly figures and a short text."""

    results: dict
    figures: dict = field(default_factory=dict)  # name -> plotly.graph_objects.Figure
    text: str = ""


@dataclass(frozen=True)
class SectionSpec:
    name: str
    title: str
    build: Callable  # ctx -> Section
    applies: Callable = lambda ctx: None  # ctx -> None | the one-line reason it is left out
    id: str = ""  # the page's section id (default: the name)
    pretrained: str | None = None  # left out of a pretrained model's report for this reason (None: it applies)
    listed: bool = True  # selectable in analyses=[...] (the model card, training curves, dynamics always come)
    origin: Origin | None = None  # a user's analysis: where it came from
    fn: Callable | None = None  # a user's analysis: its function (model, run, batch) -> results

    @property
    def section_id(self) -> str:
        return self.id or self.name


def _lazy(ref: str) -> Callable:
    """A built-in builder named by ``module:function``, imported when first called (the CLI checks its input
    before torch, plotly and TransformerLens are imported)."""
    module, attr = ref.split(":")

    def call(ctx):
        return getattr(importlib.import_module(module), attr)(ctx)

    call.__qualname__ = ref
    return call


# --- why a built-in does not apply ----------------------------------------------------------------
def _canon(name: str) -> Callable:
    return lambda ctx: _lazy_fn("toylens.report.canon:left_out")(name, ctx)


def _lazy_fn(ref: str) -> Callable:
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def _needs_mlps(ctx) -> str | None:
    return "the model is attention-only: it has no MLP neurons" if ctx.model.cfg.attn_only else None


def _needs_icl(ctx) -> str | None:
    task = None if ctx.run is None else ctx.run.task
    if task is not None and task.name == "icl":
        return None
    what = "a pretrained model" if task is None else f"a run of the {task.name} task"
    return f"task vectors need a run of the icl task (e.g. toylens-train experiment=icl_task_vectors); this is {what}"


def _needs_pairs(ctx) -> str | None:
    pairs = _lazy_fn("toylens.report.interventions:pairs_for")(ctx)
    return pairs if isinstance(pairs, str) else None


def _needs_engine_and_pairs(ctx) -> str | None:
    from toylens.model.eligibility import fast_path_reason

    why = fast_path_reason(ctx.model)
    if why:
        return f"circuit discovery runs on the fused engine, which does not compute this model ({why})"
    return _needs_pairs(ctx)


_TOY = "is drawn for toy runs"
BUILTINS: list[SectionSpec] = [  # page order
    SectionSpec("overview", "Model card", _lazy("toylens.report.card:overview"), id="model", listed=False,
                pretrained="the pretrained report has its own model card"),
    SectionSpec("training", "Training curves", _lazy("toylens.report.card:training"), listed=False,
                pretrained="a pretrained model has no training run here"),
    SectionSpec("fold", "LayerNorm folding check", _lazy("toylens.report.sections:fold"),
                pretrained="from_pretrained already folds LayerNorm (model.processing=true); the Hugging Face check "
                           "is the equivalence test here"),
    SectionSpec("induction", "Induction heads", _lazy("toylens.report.canon:induction"), _canon("induction"),
                pretrained="the induction section needs a toy run of the induction task"),
    SectionSpec("fourier", "Grokking: modular addition in the Fourier basis", _lazy("toylens.report.canon:fourier"),
                _canon("fourier"), pretrained="the Fourier section needs a toy run of modular_add"),
    SectionSpec("attention", "Attention patterns and head scores", _lazy("toylens.report.sections:attention")),
    SectionSpec("circuits", "QK and OV circuits", _lazy("toylens.report.sections:circuits"),
                pretrained="token-by-token QK/OV heatmaps are drawn for toy vocabularies, not a pretrained "
                           "tokenizer's"),
    SectionSpec("dla", "Direct logit attribution", _lazy("toylens.report.sections:dla")),
    SectionSpec("logit_lens", "Logit lens", _lazy("toylens.report.sections:logit_lens")),
    SectionSpec("neurons", "MLP neurons", _lazy("toylens.report.sections:neurons"), _needs_mlps,
                pretrained=f"MLP firing maps {_TOY} (a pretrained MLP has thousands of neurons per layer)"),
    SectionSpec("ablation", "Ablating every hook", _lazy("toylens.report.sections:ablation")),
    SectionSpec("patching", "Activation patching", _lazy("toylens.report.interventions:patching"), _needs_pairs),
    SectionSpec("tracing", "Causal tracing", _lazy("toylens.report.interventions:tracing"), _needs_pairs),
    SectionSpec("task_vectors", "Task vectors (in-context rules)", _lazy("toylens.report.interventions:task_vectors"),
                _needs_icl, pretrained="task vectors need a run of the icl task"),
    SectionSpec("discovery", "Circuit discovery", _lazy("toylens.report.discovery:discovery"),
                _needs_engine_and_pairs),
    SectionSpec("dynamics", "Training dynamics", _lazy("toylens.report.dynamics:dynamics"), listed=False,
                pretrained="a pretrained model has no checkpoints here"),
]
BY_NAME = {s.name: s for s in BUILTINS}
ANALYSES = tuple(s.name for s in BUILTINS if s.listed)  # what analyses=[...] may name, in page order
DYNAMICS_BUILTINS = ("attention", "circuits", "ablation", "discovery", "llc")  # dynamics.analyses (+ the user's)
_USER: dict[str, SectionSpec] = {}  # reference or plugin name -> its spec (loaded once per process)


def plugin_names() -> list[str]:
    return sorted(entry_points(PLUGIN_GROUP))


def resolve(name: str, key: str = "analyses", builtins: tuple[str, ...] = ANALYSES) -> SectionSpec:
    """The entry ``name`` selects: a built-in (of ``builtins``), an installed plugin, or a reference
    ``module:func`` / ``file.py:func``. ConfigError (one line) when none."""
    spec = BY_NAME.get(name)
    if spec is not None and name in builtins:
        return spec
    if name in _USER:
        return _USER[name]
    try:
        if is_ref(name):
            fn, origin = load_ref(name, key=key)
            short = getattr(fn, "__name__", name.rsplit(":", 1)[-1])
        else:
            eps = entry_points(PLUGIN_GROUP)
            if name not in eps:
                names = list(builtins) + plugin_names()
                near = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
                hint = f"did you mean {near[0]}? " if near else ""
                what = "a dynamics analysis" if key.startswith("dynamics") else "an analysis"
                raise ConfigError(f"{key}: {name!r} is not {what}; {hint}choose from {', '.join(names)}, or give "
                                  f"your own as module:function or path/to/file.py:function")
            fn, origin = load_entry_point(eps[name], key=key)
            short = name
    except RefError as e:
        raise ConfigError(str(e)) from None
    if not callable(fn):
        raise ConfigError(f"{key}={name}: {fn!r} is not a function; point at def f(model, run, batch)")
    if short in BY_NAME:
        raise ConfigError(f"{key}={name}: its name {short!r} is a built-in section's; rename the function (report.json "
                          f"keeps results under the name)")
    _USER[name] = user_spec(short, fn, origin)
    return _USER[name]


def resolve_all(names: list[str], key: str = "analyses") -> list[SectionSpec]:
    """The entries of ``names`` in page order (built-ins first, in their fixed order; then the user's as given);
    two user analyses of one name are a ConfigError naming both."""
    specs = [resolve(n, key) for n in names]
    seen: dict[str, str] = {}
    for n, s in zip(names, specs, strict=True):
        if s.origin is not None and s.name in seen and seen[s.name] != n:
            raise ConfigError(f"{key}: {seen[s.name]} and {n} are both named {s.name!r}; rename one function")
        seen[s.name] = n
    unique = list(dict.fromkeys(specs))
    return [s for s in BUILTINS if s in unique] + [s for s in unique if s.origin is not None]


# --- the user's analysis as a section ---------------------------------------------------------------
def _safe_id(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)


def user_spec(name: str, fn: Callable, origin: Origin) -> SectionSpec:
    doc = (getattr(fn, "__doc__", None) or "").strip()
    title = doc.splitlines()[0].strip() if doc else name
    own = getattr(fn, "applies", None)
    applies = (lambda ctx: own(ctx.run)) if callable(own) else (lambda ctx: None)
    spec = SectionSpec(name, title, lambda ctx: _user_section(ctx, spec), applies, id=_safe_id(name), origin=origin,
                       fn=fn)
    return spec


def split_output(out: Any, what: str) -> tuple[dict, dict, str]:
    """(JSON-able results, figures, text) of what a user's analysis returned; TypeError (one line) otherwise."""
    import json

    from toylens.result import jsonable

    if isinstance(out, AnalysisOutput):
        results, figures, text = out.results, dict(out.figures), str(out.text or "")
    else:
        results, figures, text = out, {}, ""
    if not isinstance(results, dict):
        raise TypeError(f"{what} returned {type(results).__name__}; return a dict of results (or AnalysisOutput)")
    results = jsonable(results)
    try:
        json.dumps(results, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what}'s results are not JSON-able ({e}); return numbers, strings, lists and dicts") from None
    return results, figures, text


def scalar_leaves(d: dict, prefix: str = "") -> dict[str, float]:
    """The numbers (not bools) of nested results, keys joined with '/'."""
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(scalar_leaves(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


LIST_ROW_MAX = 20  # a list of numbers up to this long is a row of the section's table; a longer one is named only


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def table_rows(d: dict, prefix: str = "") -> list[list]:
    """The section table's rows of nested results (keys joined with '/'): numbers, and lists of numbers (short ones
    shown whole, ``[0.1, 0.5]``; longer ones as ``(list of N, in report.json)``). NaN is null in the results."""
    rows: list[list] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            rows += table_rows(v, key + "/")
        elif _number(v):
            rows.append([key, float(v)])
        elif isinstance(v, list) and v and all(_number(x) or x is None for x in v):
            rows.append([key, v if len(v) <= LIST_ROW_MAX else f"(list of {len(v)}, in report.json)"])
    return rows


def call_user(spec: SectionSpec, model, run, batch):
    """The user's function on one model, under ``torch.no_grad()`` (``torch.enable_grad()`` inside for gradients)."""
    import torch

    with torch.no_grad():
        return spec.fn(model, run, batch)


def _user_section(ctx, spec: SectionSpec):
    from toylens.report.page import Figure, Note, Section, Table

    results, figures, text = split_output(call_user(spec, ctx.model, ctx.run, ctx.batch), f"analysis {spec.name}")
    ctx.data[spec.name] = results
    ctx.data.setdefault("origins", {})[spec.name] = spec.origin.to_dict()
    blocks: list = [Note(text, "info")] if text else []
    rows = table_rows(results)
    if rows:
        blocks.append(Table(["result", "value"], rows, sortable=True,
                            caption=f"report.json[{spec.name!r}]: the numbers {spec.origin.ref} returned"))
    for fig_name, fig in figures.items():
        blocks.append(Figure(f"{spec.name}/{fig_name}", fig))
    return Section(spec.section_id, spec.title, f"Your analysis {spec.origin.ref}, on the evaluation batch "
                                                f"({len(ctx.batch)} rows) at step {ctx.step}.", blocks)


def error_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or "(no message)"
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}"


def failed_section(ctx, spec: SectionSpec, e: BaseException):
    """The section of an entry whose build raised: its error, in report.json too (the rest of the report is still
    written; ``strict=true`` turns it into exit 1)."""
    from toylens.report.page import Note, Section

    line = error_line(e)
    ctx.data[spec.section_id if spec.origin is None else spec.name] = {"error": line}
    ctx.data.setdefault("errors", []).append({"analysis": spec.name, "error": line})
    return Section(spec.section_id, spec.title, "This analysis failed; the other sections are unaffected.",
                   [Note(f"FAILED: {line}", "fail")])


def resolve_dynamics(names: list[str]) -> list[SectionSpec]:
    """The user's analyses among ``dynamics.analyses`` (the built-in names are checked by the caller)."""
    return [resolve(n, key="dynamics.analyses", builtins=DYNAMICS_BUILTINS) for n in names
            if n not in DYNAMICS_BUILTINS]
