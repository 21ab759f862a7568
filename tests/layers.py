"""Test layers: file trees written by several tar writers, compressed by several gzip writers."""

from __future__ import annotations

import gzip
import io
import itertools
import os
import struct
import subprocess
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field


@dataclass
class Node:
    path: str
    kind: str = "file"  # file, dir, symlink, hardlink, fifo, char
    data: bytes = b""
    target: str = ""
    mode: int = 0o644
    mtime: float = 1_700_000_000
    pax: dict[str, str] = field(default_factory=dict)


def tar_with_tarfile(nodes: list[Node], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for n in nodes:
            ti = tarfile.TarInfo(n.path)
            ti.mode = n.mode
            ti.mtime = n.mtime
            ti.uid, ti.gid, ti.uname, ti.gname = 1000, 1000, "user", "group"
            ti.pax_headers = dict(n.pax)
            body = None
            if n.kind == "file":
                ti.size = len(n.data)
                body = io.BytesIO(n.data)
            elif n.kind == "dir":
                ti.type = tarfile.DIRTYPE
            elif n.kind == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, n.target
            elif n.kind == "hardlink":
                ti.type, ti.linkname = tarfile.LNKTYPE, n.target
            elif n.kind == "fifo":
                ti.type = tarfile.FIFOTYPE
            elif n.kind == "char":
                ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, 1, 3
            tf.addfile(ti, body)
    return buf.getvalue()


def write_tree(root: str, nodes: list[Node]) -> None:
    for n in nodes:
        path = os.path.join(root, n.path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if n.kind == "file":
            with open(path, "wb") as f:
                f.write(n.data)
            os.chmod(path, n.mode)
        elif n.kind == "dir":
            os.makedirs(path, exist_ok=True)
        elif n.kind == "symlink":
            os.symlink(n.target, path)
        elif n.kind == "hardlink":
            os.link(os.path.join(root, n.target), path)
        elif n.kind == "fifo":
            os.mkfifo(path)
        elif n.kind == "char":
            os.mknod(path, 0o600 | 0o020000, os.makedev(1, 3))
        if n.kind != "symlink":
            os.utime(path, (n.mtime, n.mtime))


def tar_with_cli(nodes: list[Node], tool: str, fmt: str) -> bytes:
    """GNU tar (fmt gnu/posix/ustar) or bsdtar (fmt pax/ustar/gnutar) over a real tree."""
    with tempfile.TemporaryDirectory() as root:
        write_tree(root, nodes)
        if tool == "gnutar":
            cmd = ["tar", f"--format={fmt}", "--sort=name", "--numeric-owner", "-C", root,
                   "-cf", "-", "."]
        else:
            cmd = ["bsdtar", "--format", fmt, "-C", root, "-cf", "-", "."]
        return subprocess.run(cmd, check=True, capture_output=True).stdout


def _gzip_header_with_extras() -> bytes:
    # FEXTRA | FNAME | FCOMMENT | FHCRC, as some writers emit.
    extra = b"AB" + struct.pack("<H", 4) + b"data"
    head = b"\x1f\x8b\x08" + bytes([0x02 | 0x04 | 0x08 | 0x10]) + struct.pack("<I", 0) + b"\x00\x03"
    head += struct.pack("<H", len(extra)) + extra + b"layer.tar\x00" + b"a comment\x00"
    return head + struct.pack("<H", zlib.crc32(head) & 0xFFFF)


def _member(raw: bytes, level: int, header: bytes | None = None) -> bytes:
    if header is None:
        return gzip.compress(raw, level, mtime=0)
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    body = c.compress(raw) + c.flush()
    return header + body + struct.pack("<II", zlib.crc32(raw), len(raw) & 0xFFFFFFFF)


GZIP_WRITERS = ["py-1", "py-6", "py-9", "gzip-cli", "pigz", "multi", "extras", "stored"]


def gzip_with(raw: bytes, writer: str) -> bytes:
    if writer.startswith("py-"):
        return gzip.compress(raw, int(writer[3:]), mtime=0)
    if writer == "gzip-cli":
        return subprocess.run(["gzip", "-c", "-6"], input=raw, check=True,
                              capture_output=True).stdout
    if writer == "pigz":
        return subprocess.run(["pigz", "-c", "-b", "128", "-p", "2"], input=raw, check=True,
                              capture_output=True).stdout
    if writer == "multi":
        # Members split at odd places, some empty: checkpoints must continue across them.
        cuts = sorted({0, len(raw), len(raw) // 3, len(raw) // 3, 2 * len(raw) // 3 + 7})
        cuts = [min(c, len(raw)) for c in cuts]
        parts = [raw[a:b] for a, b in itertools.pairwise(cuts)] + [b""]
        return b"".join(_member(p, 6) for p in parts)
    if writer == "extras":
        return _member(raw, 6, _gzip_header_with_extras())
    if writer == "stored":
        return gzip.compress(raw, 0, mtime=0)
    raise ValueError(writer)
