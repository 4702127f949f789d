"""The README's Reliability table, produced by the suite.

Each fault test carries ``@pytest.mark.reliability(fault=..., injected=..., outcome=...)``. Run the suite with
``--reliability-md FILE`` and conftest writes one table row per fault (its parametrized cases counted); then
``python -m tests.reliability FILE`` puts that table into README.md between the reliability markers.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- reliability:start -->", "<!-- reliability:end -->"


def render(rows: dict[tuple[str, str, str], list[str]]) -> str:
    lines = ["| fault | how it is injected | outcome checked | cases passed |", "|---|---|---|---|"]
    for (fault, injected, outcome), results in rows.items():
        passed = sum(r == "passed" for r in results)
        lines.append(f"| {fault} | {injected} | {outcome} | {passed}/{len(results)} |")
    return "\n".join(lines) + "\n"


def declared_faults(tests_dir: Path = ROOT / "tests") -> list[str]:
    """The ``fault=`` of every reliability mark in the test sources (read statically)."""
    faults = []
    for path in sorted(tests_dir.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "reliability":
                for kw in node.keywords:
                    if kw.arg == "fault" and isinstance(kw.value, ast.Constant):
                        faults.append(str(kw.value.value))
    return faults


def update_readme(table_md: Path, readme: Path = ROOT / "README.md") -> None:
    text = readme.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{table_md.read_text()}{END}{tail}")


if __name__ == "__main__":
    update_readme(Path(sys.argv[1]))
