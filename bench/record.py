"""Appending a dated row to a table in docs/benchmarks.md, under a heading each benchmark owns."""

from __future__ import annotations

from pathlib import Path

PAGE = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def append_row(heading: str, row: str, intro: str, columns: str, page: Path = PAGE) -> None:
    """Add row to the table under heading; the section (intro, then the table's header) is made when missing."""
    text = page.read_text() if page.exists() else "# Benchmarks\n"
    if heading not in text.splitlines():
        separator = "|" + "---|" * (columns.count("|") - 1)
        text = text.rstrip() + f"\n\n{heading}\n\n{intro}\n\n{columns}\n{separator}\n"
    lines = text.splitlines()
    at = lines.index(heading)
    end = at + 1
    while end < len(lines) and not lines[end].startswith("## "):
        end += 1
    while end > at and not lines[end - 1].startswith("|"):
        end -= 1
    lines.insert(end, row)
    page.write_text("\n".join(lines) + "\n")
