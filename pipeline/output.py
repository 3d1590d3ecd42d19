"""How library code reports without drawing anything: the CLI passes in its progress bars and its printer.

A long job takes a ProgressFactory: `with progress("tokenize", total) as advance: advance(n)`. Code that has
something to say takes an Echo (a function of one line). Both default to silence. format_value is the one
way numbers are shown, in the CLI's summaries and in the report.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, ContextManager, Iterator

Advance = Callable[[int], None]
ProgressFactory = Callable[[str, "int | None"], ContextManager[Advance]]
Echo = Callable[[str], None]


@contextmanager
def no_progress(description: str, total: int | None) -> Iterator[Advance]:
    yield lambda n: None


def silent(line: str) -> None:
    pass


def format_value(value: object) -> str:
    """4 significant digits for floats (no exponent below 10^4), thousands separators for integers."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
