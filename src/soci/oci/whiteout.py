"""OCI whiteouts: what a layer tar entry's name says about the layers below it.

The one place the naming rules live, so the lazy tree (fs/tree.py), the prefetch resolver
(prefetch/compute.py), the unpacker (unpack/extract.py) and the index builder
(index/create.py) cannot drift apart:

- ``.wh..wh..opq`` makes its directory opaque: nothing below it shows through;
- any other ``.wh..wh.*`` name is AUFS bookkeeping (``.wh..wh.plnk`` and friends);
- ``.wh.NAME`` whites out NAME in the same directory (NAME may come out as ``''``, ``.``
  or ``..``, which each caller refuses in its own way);
- anything else is a plain entry.

What a caller does with AUFS bookkeeping is its own choice: the unpacker skips it, as
containerd does, while the lazy tree and the prefetch resolver read it, as upstream's FUSE
layer does, as the whiteout of ``.wh.*``. So for AUFS names the classifier also reports the
name such a reader would hide.

Both ``str`` and ``bytes`` names are accepted; the answer has the same type.
"""

from __future__ import annotations

import enum
from typing import AnyStr

WHITEOUT_PREFIX = ".wh."
AUFS_META_PREFIX = ".wh..wh."
OPAQUE_MARKER = ".wh..wh..opq"

_BYTES = (WHITEOUT_PREFIX.encode(), AUFS_META_PREFIX.encode(), OPAQUE_MARKER.encode())
_STR = (WHITEOUT_PREFIX, AUFS_META_PREFIX, OPAQUE_MARKER)


class Kind(enum.Enum):
    """What one tar entry name means."""

    PLAIN = "plain"
    WHITEOUT = "whiteout"
    OPAQUE = "opaque"
    AUFS_META = "aufs-meta"


def _rules(name: str | bytes) -> tuple[AnyStr, AnyStr, AnyStr]:
    return _BYTES if isinstance(name, bytes) else _STR  # type: ignore[return-value]


def classify_base(base: AnyStr) -> tuple[Kind, AnyStr]:
    """What one path component (an entry's last one) means, and its target.

    PLAIN: ``base`` itself. WHITEOUT: the hidden name (possibly ``''``, ``.`` or ``..``).
    OPAQUE: ``''`` (the directory is the one holding the marker). AUFS_META: the name a
    reader that does not know AUFS would white out (``base`` less ``.wh.``).
    """
    whiteout, aufs, opaque = _rules(base)
    if base == opaque:
        return Kind.OPAQUE, base[:0]
    if base.startswith(aufs):
        return Kind.AUFS_META, base[len(whiteout):]
    if base.startswith(whiteout):
        return Kind.WHITEOUT, base[len(whiteout):]
    return Kind.PLAIN, base


def whiteout_kind(name: AnyStr) -> tuple[Kind, AnyStr]:
    """What a whole entry path (``a/b/.wh.c``, slash separated, already cleaned of ``.``
    and ``..``) means, by its last component; trailing slashes (a tar directory entry)
    are ignored.

    The target is a path like ``name``: PLAIN: ``name``; WHITEOUT and AUFS_META: the
    hidden path (``a/b/c``); OPAQUE: the opaque directory (``a/b``, ``''`` for the root).
    Directory components are not looked at: whether a path *inside* an AUFS directory
    counts is the caller's choice (see :func:`is_aufs_meta`).
    """
    slash: AnyStr = b"/" if isinstance(name, bytes) else "/"  # type: ignore[assignment]
    path = name.rstrip(slash)
    head, sep, base = path.rpartition(slash)
    kind, target = classify_base(base)
    if kind is Kind.PLAIN:
        return kind, name
    if kind is Kind.OPAQUE:
        return kind, head
    return kind, head + sep + target


def is_aufs_meta(component: str | bytes) -> bool:
    """Whether a path component is AUFS bookkeeping: any ``.wh..wh.*`` name, the opaque
    marker included (used as a directory it can only be bookkeeping too)."""
    return component.startswith(_rules(component)[1])
