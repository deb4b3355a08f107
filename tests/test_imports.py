"""The package's import arrows point one way (DESIGN.md, "Layout"): data -> model -> runs -> train;
runs + model -> analyze -> report; sweep on top. Walks every import, top-level and inside functions."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "toylens"
SHARED = {"toylens", "toylens._compat", "toylens._paths", "toylens._cli", "toylens.result", "toylens.refs",
          "toylens.configs"}  # shared top-level modules: none imports a room
ALLOWED = {  # room -> rooms it may import
    "data": {"data"},
    "model": {"model"},
    "runs": {"runs", "model", "data"},
    "train": {"train", "runs", "model", "data"},
    "analyze": {"analyze", "runs", "model", "data"},
    "report": {"report", "analyze", "runs", "model", "data"},
    "sweep": {"sweep", "train", "report", "analyze", "runs", "model", "data"},
}
# The toylens-train entry point hands multirun jobs to the sweep room (the CLI edge, not the loop).
EXCEPTIONS = {("toylens.train.cli", "toylens.sweep.job")}


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    edges = {}
    for m, f in mods.items():
        pkg = m if f.name == "__init__.py" else m.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in names:
                while t and t not in mods:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != m and not m.startswith(t + "."):
                    targets.add(t)
        edges[m] = targets
    return edges


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else None


def test_rooms_import_only_rooms_below_them():
    edges = _edges(_modules())
    bad = sorted(f"{m} -> {t}" for m, ts in edges.items() for t in ts
                 if _room(m) and t not in SHARED and (m, t) not in EXCEPTIONS
                 and _room(t) not in ALLOWED[_room(m)])
    assert bad == []


def test_no_import_cycles():
    edges = _edges(_modules())
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    assert cycles == []


def test_analysis_never_imports_training():
    edges = _edges(_modules())
    assert not [(m, t) for m, ts in edges.items() for t in ts
                if m.startswith(("toylens.analyze", "toylens.report")) and t.startswith("toylens.train")]


def test_shared_top_level_modules_import_no_room():
    edges = _edges(_modules())
    assert not [(m, t) for m in SHARED - {"toylens"} if m in edges for t in edges[m] if _room(t)]
