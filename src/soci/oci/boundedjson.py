"""JSON parsing whose memory is bounded by the size of the input.

Python objects are far larger than the JSON text naming them: ``{}`` is 3 bytes of input
(with its comma) but a 64-byte dict plus an 8-byte list slot, so a 4 MiB body of
``[{},{},...]`` parses into ~100 MiB (and each copy a caller makes doubles that). Strings,
numbers and literals cost at most ~20x their text (``"ab",`` -> a 51-byte str and a list
slot), so what lets a body blow up without bound is the number of objects and arrays.
:func:`loads` counts them in the text *before* parsing and refuses a document with more
than one per :data:`BYTES_PER_CONTAINER` bytes (after a small allowance): honest registry documents
(descriptors, configs, tag lists) spend far more text per object than that, and the
parse then costs at most a small multiple of the body's size.
"""

from __future__ import annotations

import json
import re
from typing import Any

#: Bytes of text each JSON object/array must be paid for with, on average over the
#: document. An honest descriptor is ~150 bytes; the densest honest shape, a config's
#: ``"80/tcp":{}``, is 11, but always among longer fields. At 32 the worst allowed body
#: (``[{"a":1},...]``) parses into ~7x its size, less than one of short strings.
BYTES_PER_CONTAINER = 32
#: Objects/arrays any document may have whatever its size (small documents with empty
#: maps and lists, e.g. a config's ``{"Labels":{},"Env":[]}``).
CONTAINER_ALLOWANCE = 256
#: JSON strings (escapes included), removed before counting brackets; written unrolled
#: so matching is linear in the text.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


class JsonLimitError(ValueError):
    """A document has more objects/arrays than its size honestly needs (or nests too
    deeply). A ``ValueError`` like any other unparseable JSON, but callers that must
    not mistake it for "not JSON" (e.g. a registry without the referrers API) can tell."""


def container_limit(size: int) -> int:
    """The most objects plus arrays a ``size``-byte document may hold."""
    return CONTAINER_ALLOWANCE + size // BYTES_PER_CONTAINER


def count_containers(data: bytes) -> int:
    """Objects plus arrays in JSON text (brackets outside strings). Malformed text gives
    a count too; the parser then refuses it."""
    text = _STRING.sub(b"", data)
    return text.count(b"{") + text.count(b"[")


def loads(data: bytes | bytearray | str, what: str) -> Any:
    """``json.loads`` of a document that may come from an untrusted source, in memory a
    small multiple of ``len(data)``.

    Raises :class:`JsonLimitError` (naming ``what``) for a document with too many
    objects/arrays for its size or nested too deeply, ``ValueError`` if it is not JSON.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    containers = count_containers(raw)
    limit = container_limit(len(raw))
    if containers > limit:
        raise JsonLimitError(
            f"{what} has {containers} JSON objects/arrays in {len(raw)} bytes "
            f"(at most {limit} accepted)"
        )
    try:
        return json.loads(raw)
    except RecursionError:
        raise JsonLimitError(f"{what} nests JSON too deeply") from None
