"""Listings (tables or JSON) and progress on a terminal."""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import click


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


class ProgressLine:
    """A single self-overwriting status line on stderr; silent when quiet or not a terminal."""

    def __init__(self, label: str, total: int | None = None, quiet: bool = False) -> None:
        self.label = label
        self.total = total
        self.enabled = not quiet and sys.stderr.isatty()
        self._lock = threading.Lock()
        self._last = 0.0
        self._start = time.monotonic()

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        with self._lock:
            if now - self._last < 0.1:
                return
            self._last = now
            rate = done / max(now - self._start, 1e-6)
            of = f" of {human_size(self.total)}" if self.total else ""
            sys.stderr.write(f"\r{self.label}: {human_size(done)}{of} "
                             f"({human_size(rate)}/s)\x1b[K")
            sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
