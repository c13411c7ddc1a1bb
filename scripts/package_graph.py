#!/usr/bin/env python3
"""Draw the package graph from the imports (static, ``ast``: nothing is imported) as a Mermaid
block, and keep the one in docs/architecture.md current.

    python scripts/package_graph.py            # print the block
    python scripts/package_graph.py --write    # replace the block in docs/architecture.md
    python scripts/package_graph.py --check    # exit 1 if the docs' block is stale or a rule is broken

Nodes are the product's packages (``latency_service`` split into its API layer, its settings
and the rest) and ``bench``; an edge A → B says some module of A imports a module of B (counts
are printed with ``--counts``, not drawn: the docs' block then changes only when an edge does).
The rules the layout depends on (docs/architecture.md): ``gas_core`` imports none of the others;
``latency_service`` and ``search_client`` never import each other; nothing in the product
imports ``bench`` or ``tests``. Standard library only."""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
BEGIN, END = "<!-- package-graph:begin (scripts/package_graph.py --write) -->", "<!-- package-graph:end -->"
PRODUCT = ("gas_core", "latency_service", "search_client")
GROUPS = ("latency_service.api", "latency_service.core")
FORBIDDEN = {("gas_core", "latency_service"), ("gas_core", "search_client"), ("latency_service", "search_client"),
             ("search_client", "latency_service")}


def group(module: str) -> str:
    """The graph node a module belongs to."""
    for g in GROUPS:
        if module == g or module.startswith(g + "."):
            return g
    return module.split(".")[0]


def imports(root: Path) -> Counter[tuple[str, str]]:
    """(from node, to node) → number of module-level imports, over the product and bench."""
    edges: Counter[tuple[str, str]] = Counter()
    for pkg in (*PRODUCT, "bench"):
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            src = group(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
                for name in names:
                    if name.split(".")[0] in (*PRODUCT, "bench", "tests") and group(name) != src:
                        edges[(src, group(name))] += 1
    return edges


def broken_rules(edges: Counter[tuple[str, str]]) -> list[str]:
    out = []
    for (a, b), n in sorted(edges.items()):
        top_a, top_b = a.split(".")[0], b.split(".")[0]
        if (top_a, top_b) in FORBIDDEN or (top_a in PRODUCT and top_b in ("bench", "tests")):
            out.append(f"{a} imports {b} ({n}×)")
    return out


def mermaid(edges: Counter[tuple[str, str]]) -> str:
    lines = [BEGIN, "```mermaid", "graph LR"]
    for a, b in sorted(edges):
        lines.append(f"  {a.replace('.', '_')}[{a}] --> {b.replace('.', '_')}[{b}]")
    lines += ["```", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="replace the block in docs/architecture.md")
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/architecture.md's block is stale or a "
                    "layering rule is broken")
    ap.add_argument("--root", type=Path, default=ROOT, help="repository root to read")
    ap.add_argument("--counts", action="store_true", help="also print how many module-level imports make each edge")
    args = ap.parse_args(argv)
    edges = imports(args.root)
    block = mermaid(edges)
    broken = broken_rules(edges)
    doc = args.root / "docs" / "architecture.md"
    text = doc.read_text()
    if args.write:
        if BEGIN not in text:
            sys.exit(f"package_graph: no {BEGIN} marker in {doc}")
        head, rest = text.split(BEGIN, 1)
        doc.write_text(head + block + rest.split(END, 1)[1])
        print(f"wrote the package graph into {doc}")
    elif args.check:
        if block not in text:
            print(f"package_graph: the graph in {doc} is stale: run python scripts/package_graph.py --write",
                  file=sys.stderr)
            return 1
    else:
        print(block)
    if args.counts:
        for (a, b), n in sorted(edges.items()):
            print(f"{a} -> {b}: {n}")
    for b in broken:
        print(f"package_graph: layering rule broken: {b}", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
