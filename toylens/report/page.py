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
    blocks: list[Any] = field(default_factory=list)  # Figure | Table | Note | str (a paragraph)


@dataclass
class Note:
    text: str
    kind: str = "info"  # info | pass | fail | warn


@dataclass
class Report:
    title: str
    run_name: str
    data: dict  # report.json: every number the page shows
    sections: list[Section] = field(default_factory=list)
    ablation: AblationResult | None = None

    def figures(self) -> list[Figure]:
        return [b for s in self.sections for b in s.blocks if isinstance(b, Figure)]
