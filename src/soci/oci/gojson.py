"""JSON written the way Go's encoding/json writes it, so our digests match upstream's.

Go emits struct fields in declaration order, map keys sorted, no whitespace,
and escapes ``<``, ``>``, ``&``, U+2028 and U+2029. Callers build dicts in
Go's field order (see ``soci.oci.descriptor``); maps are sorted here.
"""

from __future__ import annotations

import json
from typing import Any

_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028",
            "\u2029": "\\u2029"}
_TABLE = str.maketrans(_ESCAPES)


def dumps(value: Any) -> bytes:
    """Compact, HTML-escaped JSON bytes of ``value``."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text.translate(_TABLE).encode("utf-8")


def sorted_map(mapping: dict[str, str] | None) -> dict[str, str] | None:
    """A Go map[string]string as Go serializes it: keys in byte order; None when empty."""
    if not mapping:
        return None
    keys = sorted(mapping, key=lambda k: k.encode("utf-8", "surrogatepass"))
    return {k: mapping[k] for k in keys}
