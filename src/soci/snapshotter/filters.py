"""containerd's filter syntax, as its clients send it to List (``ctr snapshots ls``, and
containerd itself when a remote snapshotter answers "already exists")::

    filter    = selector *( "," selector )      all must hold
    selector  = fieldpath [ op value ]          no op: the field is present
    fieldpath = field *( "." field )            labels."containerd.io/snapshot.ref"
    op        = "==" / "!=" / "~="              equal, not equal, regular expression
    value     = quoted / bare                   bare: up to the next ","

Several filter strings are alternatives (any may hold). Quoted strings use Go's
escapes (``"..."``), or are raw between ``'`` or ``/`` (containerd's scanner allows all
three for values).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from soci.errors import SociError

#: Field names and bare values: what containerd's scanner takes without quotes.
_FIELD = re.compile(r"[A-Za-z0-9_\-]+")
_OPS = ("==", "!=", "~=")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "/": "/",
            "a": "\a", "b": "\b", "f": "\f", "v": "\v"}


class FilterError(SociError):
    """A filter that does not parse."""


@dataclass(frozen=True, slots=True)
class Selector:
    path: tuple[str, ...]
    op: str | None = None
    value: str = ""
    regex: re.Pattern[str] | None = None

    def matches(self, get: Callable[[tuple[str, ...]], str | None]) -> bool:
        actual = get(self.path)
        if self.op is None:
            return actual is not None
        if self.op == "!=":
            return actual != self.value
        if actual is None:
            return False
        if self.op == "==":
            return actual == self.value
        assert self.regex is not None
        return self.regex.search(actual) is not None


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, what: str) -> FilterError:
        return FilterError(f"filter {self.text!r}: {what} at position {self.pos}")

    def peek(self, s: str) -> bool:
        return self.text.startswith(s, self.pos)

    def quoted(self) -> str:
        quote = self.text[self.pos]
        self.pos += 1
        out: list[str] = []
        while self.pos < len(self.text):
            c = self.text[self.pos]
            self.pos += 1
            if c == quote:
                return "".join(out)
            if c == "\\" and quote == '"':
                if self.pos >= len(self.text):
                    break
                e = self.text[self.pos]
                self.pos += 1
                if e not in _ESCAPES:
                    raise self.error(f"unknown escape \\{e}")
                out.append(_ESCAPES[e])
            else:
                out.append(c)
        raise self.error("unterminated quoted string")

    def field(self) -> str:
        if self.pos < len(self.text) and self.text[self.pos] == '"':
            return self.quoted()
        m = _FIELD.match(self.text, self.pos)
        if m is None:
            raise self.error("expected a field name")
        self.pos = m.end()
        return m.group()

    def value(self) -> str:
        if self.pos < len(self.text) and self.text[self.pos] in "\"'/":
            return self.quoted()
        end = self.text.find(",", self.pos)
        end = len(self.text) if end < 0 else end
        value = self.text[self.pos:end]
        self.pos = end
        return value


def _parse_one(text: str) -> list[Selector]:
    s = _Scanner(text)
    selectors: list[Selector] = []
    while True:
        path = [s.field()]
        while s.peek("."):
            s.pos += 1
            path.append(s.field())
        op = next((o for o in _OPS if s.peek(o)), None)
        if op is None:
            selectors.append(Selector(tuple(path)))
        else:
            s.pos += 2
            value = s.value()
            regex = None
            if op == "~=":
                try:
                    regex = re.compile(value)
                except re.error as e:
                    raise s.error(f"bad regular expression {value!r} ({e})") from None
            selectors.append(Selector(tuple(path), op, value, regex))
        if s.pos == len(text):
            return selectors
        if not s.peek(","):
            raise s.error("expected ','")
        s.pos += 1


@dataclass(frozen=True, slots=True)
class Filter:
    """Parsed filter strings: ``matches`` holds when any alternative's selectors all hold."""

    alternatives: tuple[tuple[Selector, ...], ...]

    @classmethod
    def parse(cls, texts: Sequence[str]) -> Filter:
        return cls(tuple(tuple(_parse_one(t)) for t in texts if t.strip()))

    def matches(self, get: Callable[[tuple[str, ...]], str | None]) -> bool:
        if not self.alternatives:
            return True
        return any(all(sel.matches(get) for sel in alt) for alt in self.alternatives)
