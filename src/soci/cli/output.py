"""Listings (tables or JSON), progress bars on a terminal, and exiting on Ctrl-C."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from soci.cancel import Cancelled

F = TypeVar("F", bound=Callable[..., Any])

#: The exit status of a command stopped by SIGINT (128 + 2, as shells report it).
EXIT_INTERRUPTED = 130


def human_size(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for r in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def listing(records: Sequence[Any], *, quiet: bool, as_json: bool, headers: Sequence[str],
            row: Callable[[Any], Sequence[Any]]) -> None:
    """A listing of database records: digests only, JSON (every field), or a table."""
    if quiet:
        for r in records:
            click.echo(r.digest)
    elif as_json:
        emit_json([dataclasses.asdict(r) for r in records])
    else:
        table(headers, [row(r) for r in records])


def short(digest: str) -> str:
    """``sha256:0123456789ab``: enough to tell layers apart on a progress line."""
    return digest[:19]


class Bars:
    """Progress bars on stderr (rich): one per item in flight (a layer being indexed, a blob
    being uploaded) and one counting items done. Nothing at all when ``quiet`` or when
    stderr is not a terminal, so pipes, logs and ``--json`` output never see any of it.

    Safe to call from worker threads. Result lines go through :meth:`echo`, which keeps
    them on stdout and, when stdout is the same terminal, prints them above the bars
    instead of through them.
    """

    def __init__(self, quiet: bool) -> None:
        self.enabled = not quiet and sys.stderr.isatty()
        self._tasks: dict[str, TaskID] = {}
        self._overall: TaskID | None = None
        self._progress: Progress | None = None
        self._unit, self._done, self._total = "", 0, 0
        self._lock = threading.Lock()
        if self.enabled:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=30),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                console=Console(file=sys.stderr),
                transient=True,
                refresh_per_second=8,
            )

    def __enter__(self) -> Bars:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def overall(self, description: str, total: int, unit: str) -> None:
        """(Re)start the count of items done: ``description  [bar]  0/total unit``."""
        if self._progress is None:
            return
        if self._overall is not None:
            self._progress.remove_task(self._overall)
        self._unit, self._done, self._total = unit, 0, total
        self._overall = self._progress.add_task(description, total=total,
                                                info=f"0/{total} {unit} done")

    def advance(self) -> None:
        if self._progress is None or self._overall is None:
            return
        with self._lock:
            self._done += 1
            self._progress.update(self._overall, completed=self._done,
                                  info=f"{self._done}/{self._total} {self._unit} done")

    def update(self, key: str, description: str, completed: int, total: int | None,
               info: str) -> None:
        """Show item ``key`` (created on first use) at ``completed`` of ``total``."""
        if self._progress is None:
            return
        task = self._tasks.get(key)
        if task is None:
            task = self._tasks[key] = self._progress.add_task(description, total=total,
                                                              info=info)
        self._progress.update(task, completed=completed, total=total, info=info)

    def remove(self, key: str) -> None:
        if self._progress is not None and (task := self._tasks.pop(key, None)) is not None:
            self._progress.remove_task(task)

    def echo(self, line: str, err: bool = False) -> None:
        """A result line (stdout) or a note (``err``: stderr), printed above the bars when
        it would otherwise land on the terminal they are drawn on."""
        if self._progress is not None and (err or sys.stdout.isatty()):
            self._progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            click.echo(line, err=err)


def exit_on_interrupt(func: F) -> F:
    """Ctrl-C ends the command with one line on stderr and status 130, no traceback. (The
    library has already stopped its workers and removed anything half-written.)"""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (KeyboardInterrupt, Cancelled):
            click.echo("soci: interrupted", err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]
