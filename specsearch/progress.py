"""Progress bars for long work: rich, on stderr, drawn only when stderr is a terminal (never in
logs, pipes or tests), and cleared when the work is done.

``progress(description, total)`` yields ``advance(n)`` for one task; ``bar()`` is the underlying
``rich.progress.Progress`` for work with several tasks (ingest: scanning, reading, merging).
Every long stage takes ``show_progress`` (the same name everywhere) and passes it here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import Progress


def bar(show_progress: bool = True, unit: str = "") -> Progress:
    """description, bar, done/total [unit], rate, elapsed and remaining time."""
    # rich is imported here, not above: commands that draw no bar (search, sql) skip its cost
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        """Units done per second, once rich has measured it."""

        def render(self, task) -> Text:
            return Text("" if task.speed is None else f"{task.speed:,.0f} {unit}/s")

    console = Console(stderr=True)
    columns: list[ProgressColumn] = [TextColumn("{task.description}"), BarColumn()]
    columns.append(MofNCompleteColumn())
    if unit:
        columns += [TextColumn(unit), Rate()]
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    return Progress(
        *columns,
        console=console,
        transient=True,
        disable=not (show_progress and console.is_terminal),
    )


@contextlib.contextmanager
def progress(
    description: str, total: int | None, show_progress: bool = True, unit: str = ""
) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``: report n more units of ``total`` done."""
    with bar(show_progress, unit) as display:
        task = display.add_task(description, total=total)
        yield lambda n: display.advance(task, n)
