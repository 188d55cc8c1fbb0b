"""Progress bars for long work (rich). Library code asks for a bar; the CLI decides whether bars show.

``bar(desc, total)`` returns an object with ``advance(n=1, **fields)`` and ``close()``. When bars are
off (tests, library use without ``enable()``) it is a no-op.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

_progress = None


def enable() -> None:
    global _progress
    if _progress is None:
        # deferred: rich loads when output is shown, not on import
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        _progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                             transient=True)
        _progress.start()


def disable() -> None:
    global _progress
    if _progress is not None:
        _progress.stop()
        _progress = None


class _Bar:
    def __init__(self, desc: str, total: int | None):
        self.task = _progress.add_task(desc, total=total, info="") if _progress else None

    def advance(self, n: int = 1, **fields) -> None:
        if self.task is not None and _progress is not None:
            info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            _progress.update(self.task, advance=n, info=info)

    def close(self) -> None:
        if self.task is not None and _progress is not None:
            _progress.remove_task(self.task)
            self.task = None


@contextlib.contextmanager
def bar(desc: str, total: int | None = None) -> Iterator[_Bar]:
    b = _Bar(desc, total)
    try:
        yield b
    finally:
        b.close()


def log(msg: str) -> None:
    """Print a line above the bars (or plainly when bars are off)."""
    if _progress is not None:
        _progress.console.print(msg)
    else:
        # deferred: rich loads when output is shown, not on import
        from rich.console import Console

        Console(stderr=True, highlight=False).print(msg)
