"""Progress bars for long work, silenced by ``--quiet`` or ``progress=False``.

A thin layer over :mod:`rich.progress`: solvers call :func:`iterations` and
:func:`tasks` instead of importing rich themselves, so that one switch
(:func:`set_quiet`) governs every bar in the library.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

_QUIET = False


def set_quiet(quiet: bool) -> None:
    """Silence (or restore) every progress bar of the library."""
    global _QUIET
    _QUIET = bool(quiet)


def enabled(progress: bool | None = None) -> bool:
    """Whether a bar should be drawn, given a call's own ``progress`` flag."""
    if _QUIET:
        return False
    return True if progress is None else bool(progress)


class _Bar:
    """Handle on one running bar; ``update`` accepts the objective to show."""

    def __init__(self, progress: Progress | None, task):
        self._progress = progress
        self._task = task

    def advance(self, n: int = 1, **fields) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=n, **fields)

    def set_description(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=text)


@contextlib.contextmanager
def bar(description: str, total: int | None, progress: bool | None = None) -> Iterator[_Bar]:
    """A progress bar on stderr, or a silent stand-in.

    Parameters
    ----------
    description : str
        Shown left of the bar (e.g. ``"robust-t VB"``).
    total : int or None
        Number of steps (``max_iter`` for a solver); None for unknown.
    progress : bool, optional
        The caller's wish; ``False`` or a global :func:`set_quiet` silences it.
    """
    if not enabled(progress):
        yield _Bar(None, None)
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    console = Console(file=sys.stderr)
    with Progress(*columns, console=console, transient=True) as prog:
        task = prog.add_task(description, total=total, info="")
        yield _Bar(prog, task)
