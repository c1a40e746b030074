"""Progress for the slow steps (capture, calibration, each pass, the cost model, kernel builds):
a live rich display on a terminal, one plain line per step otherwise (logs, CI), nothing when
turned off with ``optimize(..., progress=False)`` or ``GRAPHOPT_PROGRESS=0``.

Code that does slow work calls :func:`task`; it shows only while :func:`showing` is active
(``graphopt.optimize`` turns it on), so library calls from elsewhere stay quiet."""
from __future__ import annotations

import contextvars
import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator

ENV = "GRAPHOPT_PROGRESS"
_active: contextvars.ContextVar["_Display | None"] = contextvars.ContextVar("graphopt_progress", default=None)


def enabled_by_env() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@contextmanager
def showing(enabled: bool | None = None, console=None) -> Iterator[None]:
    """Show the tasks started inside this block. ``enabled=None``: on unless ``GRAPHOPT_PROGRESS=0``;
    ``console``: a ``rich.console.Console`` (default: stderr). Nested blocks reuse the outer display."""
    if _active.get() is not None or not (enabled_by_env() if enabled is None else enabled):
        yield
        return
    display = _Display(console)
    token = _active.set(display)
    try:
        yield
    finally:
        _active.reset(token)
        display.close()


@contextmanager
def task(description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """A step; yields ``advance(n=1)`` for steps with a ``total`` (e.g. calibration batches)."""
    display = _active.get()
    if display is None:
        yield lambda n=1: None
        return
    with display.task(description, total) as advance:
        yield advance


class _Display:
    def __init__(self, console=None):
        from rich.console import Console

        self.console = console if console is not None else Console(stderr=True)
        self.live = self.console.is_terminal
        self.bars = None

    @contextmanager
    def task(self, description: str, total: int | None):
        start = time.perf_counter()
        if not self.live:
            self.console.print(f"graphopt: {description} ...", highlight=False, soft_wrap=True)
            yield lambda n=1: None
            self.console.print(f"graphopt: {description}: done ({time.perf_counter() - start:.1f} s)",
                               highlight=False, soft_wrap=True)
            return
        bars = self._bars()
        tid = bars.add_task(description, total=total)
        yield lambda n=1: bars.advance(tid, n)
        bars.update(tid, total=total or 1, completed=total or 1)

    def _bars(self):
        if self.bars is None:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                       TimeElapsedColumn)

            self.bars = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=self.console)
            self.bars.start()
        return self.bars

    def close(self) -> None:
        if self.bars is not None:
            self.bars.stop()
