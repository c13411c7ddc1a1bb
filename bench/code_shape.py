"""The code's shape, for refactoring notes: functions longer than a limit, and the import graph
between the modules of each package (with any cycle). Static (``ast``): nothing is imported.

``python -m bench.code_shape [--root DIR] [--limit 60] [--out FILE]``
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

from bench.common import write_result

PACKAGES = ("gas_core", "latency_service", "search_client", "bench")


def long_functions(root: Path, limit: int) -> list[dict]:
    rows = []
    for path in sorted(p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > limit:
                    rows.append({"where": f"{path.relative_to(root)}:{node.lineno}", "function": node.name, "lines": n})
    return sorted(rows, key=lambda r: -r["lines"])


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, list[str]]:
    """module → the modules of the same repository it imports (at any depth of the file)."""
    mods = {module_name(root, p): p for pkg in (*PACKAGES, "tests") for p in (root / pkg).rglob("*.py")}
    graph: dict[str, list[str]] = {}
    for name, path in sorted(mods.items()):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            deps.update(t for t in targets if t in mods and t != name)
        graph[name] = sorted(deps)
    return graph


def cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("."), help="repository root to read")
    ap.add_argument("--limit", type=int, default=60, help="report functions longer than this many lines")
    ap.add_argument("--out", type=Path, default=None, help="JSON output (default: bench/results/)")
    args = ap.parse_args()
    root = args.root.resolve()
    longs, graph = long_functions(root, args.limit), import_graph(root)
    print(f"functions over {args.limit} lines: {len(longs)}")
    for r in longs:
        print(f"  {r['lines']:4d}  {r['where']}  {r['function']}")
    cross = {m: [d for d in deps if d.split(".")[0] != m.split(".")[0] and d.split(".")[0] != "gas_core"]
             for m, deps in graph.items()}
    print("imports between packages other than into gas_core:")
    for m, deps in cross.items():
        if deps:
            print(f"  {m} -> {', '.join(deps)}")
    cyc = cycles(graph)
    print(f"import cycles: {len(cyc)}")
    for c in cyc:
        print(f"  {' <-> '.join(c)}")
    write_result("code_shape", {"root": str(root), "limit": args.limit, "long_functions": longs, "imports": graph,
                                "cycles": cyc}, args.out)


if __name__ == "__main__":
    main()
