"""Progress for the slow steps (capture, calibration, each pass, the cost model, kernel builds, opt-cli's
reading, lowering and --check): a live rich display on a terminal, one plain line per step otherwise
(logs, CI), nothing when turned off with ``optimize(..., progress=False)``, ``GRAPHOPT_PROGRESS=0`` or
``opt-cli -q``. Every finished step's seconds are recorded, shown or not (opt-cli's report lists them).

Code that does slow work calls :func:`task`; it shows only while :func:`showing` is active
(``graphopt.optimize`` and opt-cli turn it on), so library calls from elsewhere stay quiet."""
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
def showing(enabled: bool | None = None, console=None, name: str = "graphopt") -> Iterator[dict[str, float]]:
    """Show the tasks started inside this block; yields the seconds each finished task took, by its key
    (recorded also when nothing is shown). ``enabled=None``: on unless ``GRAPHOPT_PROGRESS=0``;
    ``console``: a ``rich.console.Console`` (default: stderr); ``name`` starts each plain line.
    Nested blocks reuse the outer display."""
    outer = _active.get()
    if outer is not None:
        yield outer.timings
        return
    display = _Display(console, name, shown=enabled_by_env() if enabled is None else enabled)
    token = _active.set(display)
    try:
        yield display.timings
    finally:
        _active.reset(token)
        display.close()


@contextmanager
def task(description: str, total: int | None = None, key: str | None = None) -> Iterator[Callable[[int], None]]:
    """A step; yields ``advance(n=1)`` for steps with a ``total`` (e.g. calibration batches). Its seconds
    add up under ``key`` (default: the description)."""
    display = _active.get()
    if display is None:
        yield lambda n=1: None
        return
    start = time.perf_counter()
    with display.task(description, total) as advance:
        yield advance
    seconds = time.perf_counter() - start
    name = key or description
    display.timings[name] = round(display.timings.get(name, 0.0) + seconds, 4)


class _Display:
    def __init__(self, console=None, name: str = "graphopt", shown: bool = True):
        self.name = name
        self.shown = shown
        self.timings: dict[str, float] = {}
        self.bars = None
        if shown:
            from rich.console import Console

            self.console = console if console is not None else Console(stderr=True)
            self.live = self.console.is_terminal

    @contextmanager
    def task(self, description: str, total: int | None):
        if not self.shown:
            yield lambda n=1: None
            return
        start = time.perf_counter()
        if not self.live:
            self.console.print(f"{self.name}: {description} ...", highlight=False, soft_wrap=True)
            yield lambda n=1: None
            self.console.print(f"{self.name}: {description}: done ({time.perf_counter() - start:.1f} s)",
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
