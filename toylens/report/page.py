"""What a report is made of: sections of figures, tables and notes, plus report.json's data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from toylens.analyze.ablation import AblationResult


@dataclass
class Figure:
    """A plotly figure placed on the page; ``name`` is the analysis's own key (``attention/L0H0``)."""

    name: str
    fig: Any  # plotly.graph_objects.Figure
    wide: bool = False  # spans the whole page width
    id: str = ""  # set by Report.add_figure


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""
    sortable: bool = False
    highlight: set[int] = field(default_factory=set)  # row indices drawn in bold


@dataclass
class Section:
    id: str
    title: str
    intro: str  # one or two sentences for students: what the plots mean
    blocks: list[Any] = field(default_factory=list)  # Figure | View | Table | Note | str (a paragraph)


@dataclass
class Note:
    text: str
    kind: str = "info"  # info | pass | fail | warn


@dataclass
class View:
    """An interactive CircuitsVis view (``report.circuitsvis_views``): the React component's name and its
    props, drawn in the browser by the bundle the report folder holds once (``circuitsvis.js``)."""

    name: str  # the view's key in report.json, e.g. ``circuitsvis/attention_heads/row0``
    component: str  # AttentionHeads | AttentionPatterns | ColoredTokens (a CircuitsVis export)
    props: dict
    title: str = ""
    caption: str = ""  # one or two sentences: what the view shows and how to read it
    collapsed: bool = False  # drawn inside a closed <details>: the reader opens it (keeps long pages short)
    id: str = ""  # set by index_figures


@dataclass
class Report:
    title: str
    run_name: str
    data: dict  # report.json: every number the page shows
    sections: list[Section] = field(default_factory=list)
    ablation: AblationResult | None = None
    # more files in the report folder: relative path -> writer(path), called inside the atomic write
    # (e.g. "dynamics/llc.zarr", the LLC's per-chain traces)
    files: dict = field(default_factory=dict)

    def figures(self) -> list[Figure]:
        return [b for s in self.sections for b in s.blocks if isinstance(b, Figure)]

    def views(self) -> list[View]:
        return [b for s in self.sections for b in s.blocks if isinstance(b, View)]
