"""The prefetch artifact: which spans of one layer to fetch as soon as it is mounted.

Upstream SOCI (v0.13+) stores it as a JSON blob of media type
``application/vnd.amazon.soci.prefetch.v1+json`` next to the zTOCs in a SOCI index,
annotated with the layer digest it is for. It is written here exactly as Go's
``json.Marshal`` writes upstream's ``PrefetchArtifact``: fields in declaration order
(``version``, ``prefetch_spans``; per span ``start_span``, ``end_span`` and ``priority``
only when non-zero), no whitespace, so an artifact built here has upstream's digest.

Every artifact read is hostile until checked: its size is bounded before it is parsed,
its JSON is parsed with bounded memory, and every span range must lie within the zTOC
it will be used with.
"""

from __future__ import annotations

from dataclasses import dataclass

from soci.errors import SociError
from soci.oci import boundedjson, gojson

VERSION = "1.0"
#: No artifact may be larger than this. One span range is at most ~60 bytes of JSON and a
#: merged artifact names each span at most once, so this covers layers of ~70,000 ranges.
MAX_ARTIFACT_BYTES = 4 << 20
_INT64 = 1 << 63


class PrefetchFormatError(SociError):
    """A prefetch artifact is malformed, too large, of another version, or names spans its
    layer's zTOC does not have."""


class EmptyPrefetchError(PrefetchFormatError):
    """An artifact with no span ranges (upstream refuses to write or use one)."""


@dataclass(frozen=True, slots=True)
class PrefetchSpan:
    """Spans ``start``..``end`` (both included) of the layer's zTOC; lower ``priority`` is
    more urgent (upstream reserves it for later; 0, the default, is left out of the JSON)."""

    start: int
    end: int
    priority: int = 0

    @property
    def count(self) -> int:
        return self.end - self.start + 1


@dataclass(frozen=True, slots=True)
class PrefetchArtifact:
    spans: tuple[PrefetchSpan, ...]
    version: str = VERSION

    @property
    def total_spans(self) -> int:
        """Spans named, counting each range whole (as upstream's ``soci prefetch`` does)."""
        return sum(s.count for s in self.spans)

    def span_ids(self) -> list[int]:
        """Each span named, once, in ascending order."""
        return sorted({i for s in self.spans for i in range(s.start, s.end + 1)})

    def encode(self) -> bytes:
        """Upstream's bytes for this artifact (Go's ``json.Marshal``)."""
        if not self.spans:
            raise EmptyPrefetchError("prefetch artifact is empty")
        spans = []
        for s in self.spans:
            item: dict[str, int] = {"start_span": s.start, "end_span": s.end}
            if s.priority:
                item["priority"] = s.priority
            spans.append(item)
        return gojson.dumps({"version": self.version, "prefetch_spans": spans})

    def to_json(self) -> dict[str, object]:
        return {"version": self.version,
                "prefetch_spans": [{"start_span": s.start, "end_span": s.end,
                                    **({"priority": s.priority} if s.priority else {})}
                                   for s in self.spans]}


def merge_spans(spans: list[PrefetchSpan]) -> tuple[PrefetchSpan, ...]:
    """Sort ranges and merge those that overlap or touch (upstream's normalization, so the
    same files give the same artifact bytes). A merged range keeps the first one's
    priority, as upstream does."""
    if not spans:
        return ()
    ordered = sorted(spans, key=lambda s: (s.start, s.end))
    merged = [ordered[0]]
    for s in ordered[1:]:
        last = merged[-1]
        if s.start <= last.end + 1:
            if s.end > last.end:
                merged[-1] = PrefetchSpan(last.start, s.end, last.priority)
        else:
            merged.append(s)
    return tuple(merged)


def _int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise PrefetchFormatError(f"prefetch artifact: {what} must be an integer")
    if not -_INT64 <= value < _INT64:
        raise PrefetchFormatError(f"prefetch artifact: {what} is out of range")
    return value


def parse_artifact(data: bytes, span_count: int | None = None) -> PrefetchArtifact:
    """Check and decode an artifact's bytes. With ``span_count`` (the zTOC's), every range
    must name spans that exist: ``0 <= start <= end < span_count``."""
    if len(data) > MAX_ARTIFACT_BYTES:
        raise PrefetchFormatError(
            f"prefetch artifact is {len(data)} bytes (at most {MAX_ARTIFACT_BYTES} accepted)")
    try:
        doc = boundedjson.loads(data, "prefetch artifact")
    except ValueError as e:
        raise PrefetchFormatError(f"prefetch artifact is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise PrefetchFormatError("prefetch artifact is not a JSON object")
    version = doc.get("version")
    if version != VERSION:
        raise PrefetchFormatError(
            f"unsupported prefetch artifact version {version!r} (expected {VERSION!r})")
    raw = doc.get("prefetch_spans")
    if raw is None or raw == []:
        raise EmptyPrefetchError("prefetch artifact is empty")
    if not isinstance(raw, list):
        raise PrefetchFormatError("prefetch artifact: prefetch_spans must be a list")
    spans = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise PrefetchFormatError(f"prefetch artifact: span range {i} is not an object")
        start = _int(item.get("start_span", 0), f"span range {i} start_span")
        end = _int(item.get("end_span", 0), f"span range {i} end_span")
        priority = _int(item.get("priority", 0), f"span range {i} priority")
        if not 0 <= start <= end:
            raise PrefetchFormatError(
                f"prefetch artifact: span range {i} runs from {start} to {end}")
        if span_count is not None and end >= span_count:
            raise PrefetchFormatError(
                f"prefetch artifact: span range {i} ends at span {end}, but the layer's zTOC "
                f"has {span_count} spans")
        spans.append(PrefetchSpan(start, end, priority))
    return PrefetchArtifact(tuple(spans), VERSION)
