"""A layer's file tree, built from its zTOC, as containers/storage expects a layer ``diff``.

Paths are cleaned (``./a//b`` is ``a/b``); entries that would escape the layer
(``..``) or carry NUL are dropped with a warning. Later entries replace
earlier ones with the same path, as tar extraction does. Directories that only
appear as path prefixes are created (0755, root). Hard links share their
target's inode. OCI whiteouts become overlayfs whiteouts: ``.wh.NAME`` is a
0/0 character device called NAME and ``.wh..wh..opq`` marks its directory
opaque with the ``trusted.overlay.opaque`` xattr.

What the kernel could not be shown faithfully refuses the whole zTOC
(``ZtocFormatError``), so the store answers "not here" and podman extracts the
layer itself: a whiteout of '', '.' or '..', a name over NAME_MAX or a path over
PATH_MAX, a symlink target no symlink can hold, a uid/gid beyond 32 bits, a
device number beyond FUSE's 12-bit major and 20-bit minor.
"""

from __future__ import annotations

import calendar
import logging
import os
import stat
from dataclasses import dataclass, field

from soci.errors import ZtocFormatError
from soci.oci.whiteout import Kind, classify_base
from soci.ztoc.model import FileMetadata, Ztoc

log = logging.getLogger("soci.fs")

OPAQUE_XATTR = b"trusted.overlay.opaque"
ROOT = 1

#: Linux's longest file name, and longest path (with its NUL) a system call takes.
NAME_MAX = 255
PATH_MAX = 4096
_ID_MAX = (1 << 32) - 1
_MAJOR_MAX = (1 << 12) - 1
_MINOR_MAX = (1 << 20) - 1

_TYPE_BITS = {
    "reg": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
}


@dataclass(slots=True)
class Node:
    """One inode. ``offset`` is where a regular file's bytes start in the tar stream."""

    mode: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    rdev: int = 0
    nlink: int = 1
    offset: int = 0
    target: bytes = b""
    xattrs: dict[bytes, bytes] | None = None
    children: dict[bytes, int] | None = field(default=None)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def parse_mod_time(text: str) -> int:
    """RFC 3339 (as upstream writes it, any offset) to nanoseconds since the epoch."""
    if not text:
        return 0
    try:
        if text.endswith("Z"):
            body, offset = text[:-1], 0
        else:
            body, sign, tz = text[:-6], text[-6], text[-5:]
            offset = (int(tz[:2]) * 3600 + int(tz[3:]) * 60) * (1 if sign == "+" else -1)
        whole, _, frac = body.partition(".")
        date, _, clock = whole.partition("T")
        y, mo, d = (int(x) for x in date.split("-"))
        h, mi, s = (int(x) for x in clock.split(":"))
        seconds = calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)) - offset
        return seconds * 1_000_000_000 + int(frac[:9].ljust(9, "0") if frac else 0)
    except (ValueError, IndexError):
        return 0


def _clean(name: str) -> list[bytes] | None:
    raw = name.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        return None
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        return None
    return parts


def _refuse(e: FileMetadata, why: str) -> ZtocFormatError:
    return ZtocFormatError(f"zTOC entry {e.name[:100]!r} {why}")


class LayerTree:
    """Inodes numbered from 1 (the root); ``nodes[ino]``.

    Raises ``ZtocFormatError`` for a zTOC that no Linux filesystem could hold (a name
    that is no directory entry, a name or symlink longer than the kernel allows, a
    device number or owner that does not fit): served, it would answer EIO where
    podman, told the layer is not here, pulls it and extracts it itself.
    Paths are walked, never recursed, so any depth a zTOC may hold is built.
    """

    def __init__(self, ztoc: Ztoc) -> None:
        self.nodes: list[Node | None] = [None, Node(stat.S_IFDIR | 0o755, nlink=2, children={})]
        for entry in ztoc.entries:
            self._add(entry)
        self._count_links()

    def __len__(self) -> int:
        return len(self.nodes) - 1

    def node(self, ino: int) -> Node:
        node = self.nodes[ino] if 0 < ino < len(self.nodes) else None
        if node is None:
            raise KeyError(ino)
        return node

    def lookup(self, parent: int, name: bytes) -> int | None:
        children = self.node(parent).children
        return None if children is None else children.get(name)

    def _walk(self, parts: list[bytes]) -> int | None:
        """The inode at ``parts`` below the root, or None."""
        ino = ROOT
        for name in parts:
            children = self.node(ino).children
            found = None if children is None else children.get(name)
            if found is None:
                return None
            ino = found
        return ino

    def _dir(self, parts: list[bytes]) -> int:
        """The directory at ``parts``; missing ones (or non-directories in the way, as tar
        extraction replaces them) become new 0755 root-owned directories."""
        ino = ROOT
        for name in parts:
            children = self.node(ino).children
            assert children is not None
            child = children.get(name)
            if child is None or not self.node(child).is_dir:
                child = self._attach(ino, name, Node(stat.S_IFDIR | 0o755, nlink=2, children={}))
            ino = child
        return ino

    def _attach(self, parent: int, name: bytes, node: Node, ino: int = 0) -> int:
        if not ino:
            self.nodes.append(node)
            ino = len(self.nodes) - 1
        children = self.node(parent).children
        assert children is not None
        children[name] = ino
        return ino

    def _add(self, e: FileMetadata) -> None:
        parts = _clean(e.name)
        if parts is None:
            log.warning("layer entry %r skipped: its path escapes the layer or holds NUL",
                        e.name)
            return
        if not parts:
            root = self.nodes[ROOT]
            assert root is not None
            if e.type == "dir":
                root.mode = stat.S_IFDIR | (e.mode & 0o7777)
                root.uid, root.gid = _owner(e)
                root.mtime_ns = parse_mod_time(e.mod_time)
                root.xattrs = _xattrs(e)
            return
        if any(len(p) > NAME_MAX for p in parts):
            raise _refuse(e, f"has a name longer than {NAME_MAX} bytes")
        if sum(map(len, parts)) + len(parts) > PATH_MAX:
            raise _refuse(e, f"has a path longer than {PATH_MAX - 1} bytes")
        parent = self._dir(parts[:-1])
        base = parts[-1]
        kind, hidden = classify_base(base)
        if kind is Kind.OPAQUE:
            node = self.node(parent)
            node.xattrs = {**(node.xattrs or {}), OPAQUE_XATTR: b"y"}
            return
        if kind is not Kind.PLAIN:  # AUFS bookkeeping too: upstream's FUSE layer does so
            if hidden in (b"", b".", b".."):
                raise _refuse(e, f"whites out {hidden.decode()!r}, which is no file name")
            self._attach(parent, hidden, Node(stat.S_IFCHR, mtime_ns=parse_mod_time(e.mod_time)))
            return
        if e.type == "hardlink":
            target_parts = _clean(e.linkname)
            target = self._walk(target_parts) if target_parts else None
            target_node = self.nodes[target] if target else None
            if target_node is None or target_node.is_dir:
                log.warning("hard link %r skipped: target %r is not in the layer", e.name,
                            e.linkname)
                return
            self._attach(parent, base, target_node, target)
            return
        bits = _TYPE_BITS.get(e.type)
        if bits is None:
            log.warning("layer entry %r skipped: unknown type %s", e.name, e.type)
            return
        uid, gid = _owner(e)
        node = Node(
            bits | (e.mode & 0o7777), uid, gid,
            e.size if e.type == "reg" else 0,
            parse_mod_time(e.mod_time),
            _rdev(e) if e.type in ("char", "block") else 0,
            offset=e.offset,
            xattrs=_xattrs(e),
        )
        if e.type == "symlink":
            node.target = e.linkname.encode("utf-8", "surrogateescape")
            if len(node.target) >= PATH_MAX or b"\0" in node.target:
                raise _refuse(e, "is a symlink to no possible path")
            node.size = len(node.target)
        children = self.node(parent).children
        assert children is not None
        existing = children.get(base)
        if e.type == "dir":
            node.children = {}
            old = self.nodes[existing] if existing else None
            if old is not None and old.is_dir:
                node.children = old.children  # a directory entry repeated keeps its contents
                self.nodes[existing] = node  # type: ignore[index]
                return
        self._attach(parent, base, node)

    def _count_links(self) -> None:
        counts: dict[int, int] = {}
        for node in self.nodes:
            if node is None or node.children is None:
                continue
            for child in node.children.values():
                counts[child] = counts.get(child, 0) + 1
        for ino, node in enumerate(self.nodes):
            if node is None:
                continue
            if node.children is not None:
                subdirs = sum(1 for c in node.children.values()
                              if self.nodes[c] is not None and self.nodes[c].is_dir)  # type: ignore[union-attr]
                node.nlink = 2 + subdirs
            else:
                node.nlink = max(counts.get(ino, 1), 1)


def _owner(e: FileMetadata) -> tuple[int, int]:
    """uid and gid, which the kernel (and FUSE) hold in 32 bits."""
    if not (0 <= e.uid <= _ID_MAX and 0 <= e.gid <= _ID_MAX):
        raise _refuse(e, f"has owner {e.uid}:{e.gid}, beyond 32 bits")
    return e.uid, e.gid


def _rdev(e: FileMetadata) -> int:
    """The device number as the kernel encodes it: FUSE hands the kernel 32 bits, 12 for
    the major and 20 for the minor (os.makedev's wider glibc encoding would be cut)."""
    if not (0 <= e.devmajor <= _MAJOR_MAX and 0 <= e.devminor <= _MINOR_MAX):
        raise _refuse(e, f"has device number {e.devmajor}:{e.devminor}, which Linux cannot "
                         f"hold (major < {_MAJOR_MAX + 1}, minor < {_MINOR_MAX + 1})")
    return os.makedev(e.devmajor, e.devminor)


#: The kernel's limits on an extended attribute (XATTR_NAME_MAX, XATTR_SIZE_MAX).
_XATTR_NAME_MAX = 255
_XATTR_SIZE_MAX = 65536
#: Attributes overlayfs reads from its lower layers (opaque dirs, redirects, metacopy):
#: only the store sets them (from OCI whiteouts); a layer carrying its own could steer the
#: merged view of a container beyond its own files.
_OVERLAY_XATTRS = (b"trusted.overlay.", b"user.overlay.")


def _xattrs(e: FileMetadata) -> dict[bytes, bytes] | None:
    found = e.xattrs
    if not found:
        return None
    out = {}
    for key, value in found.items():
        name = key.encode("utf-8", "surrogateescape")
        data = value.encode("utf-8", "surrogateescape")
        if not name or b"\0" in name or len(name) > _XATTR_NAME_MAX:
            raise _refuse(e, f"has an extended attribute name Linux cannot hold "
                             f"({len(name)} bytes)")
        if len(data) > _XATTR_SIZE_MAX:
            raise _refuse(e, f"has a {len(data)}-byte value for extended attribute "
                             f"{key[:64]!r} (limit {_XATTR_SIZE_MAX})")
        if name.startswith(_OVERLAY_XATTRS):
            raise _refuse(e, f"carries overlayfs's own extended attribute {key[:64]!r}")
        out[name] = data
    return out
