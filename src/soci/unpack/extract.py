"""Unpack one layer blob into a directory in overlayfs format, verifying both digests.

The tree is built in a staging sibling ``<dest>.tmp-XXXX`` and renamed onto ``dest`` (absent
or an empty directory) only once the compressed digest, the size and the diff ID all
matched; on any error the staging directory is removed, so a destination never shows a
half-unpacked or unverified layer.

Safety, since every byte of a layer is hostile: names are normalised component by
component, absolute names and ``..`` are refused, every parent is opened with
``O_NOFOLLOW|O_DIRECTORY`` from the staging root (so nothing is created through a
symlink, even one the same layer planted), files are created ``O_EXCL|O_NOFOLLOW``,
hardlink targets are resolved the same way, and ``trusted.overlay.*`` attributes may come
only from whiteout conversion, never from the tar.

Overlay conversion (what containerd's overlay applier does): ``.wh.NAME`` becomes a 0:0
character device ``NAME`` owned as the whiteout entry; ``.wh..wh..opq`` sets
``trusted.overlay.opaque=y`` on its directory; other ``.wh..wh.*`` names (AUFS
bookkeeping) are skipped.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import os
import re
import shutil
import stat
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from isal import igzip, igzip_threaded

from soci.errors import SociError
from soci.oci.whiteout import Kind, classify_base, is_aufs_meta
from soci.unpack.errors import (
    LayerDigestError,
    UnpackCancelledError,
    UnpackError,
    UnsafeLayerError,
    UnsupportedLayerError,
)
from soci.unpack.tarstream import (
    BLOCKDEV,
    CHAR,
    DIRECTORY,
    FIFO,
    HARDLINK,
    REGULAR,
    SYMLINK,
    CorruptLayerError,
    Entry,
    TarInput,
    TarReader,
    _show,
)

GZIP_TYPES = frozenset({
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
})
TAR_TYPES = frozenset({
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.docker.image.rootfs.diff.tar",
})
_DIGEST = re.compile(r"^(sha256:[0-9a-f]{64}|sha384:[0-9a-f]{96}|sha512:[0-9a-f]{128})$")
MAX_PATH = 4095
MAX_NAME = 255
MAX_XATTR_VALUE = 65536
#: Pending directory modes/mtimes are the only per-entry state kept; bound them.
MAX_DIRECTORIES = 1_000_000
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_FD_CACHE = 64


@dataclass(frozen=True, slots=True)
class UnpackResult:
    """What a finished unpack produced: ``path`` is the (renamed) destination."""

    digest: str
    diff_id: str
    path: str
    compressed_bytes: int
    uncompressed_bytes: int
    entries: int


def compression_of(media_type: str) -> str:
    """``"gzip"`` or ``"none"``; anything else (zstd, encrypted, unknown) is unsupported."""
    if media_type in GZIP_TYPES:
        return "gzip"
    if media_type in TAR_TYPES:
        return "none"
    raise UnsupportedLayerError(f"layer media type {media_type!r} is not supported here")


def check_digest(digest: str, what: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise UnpackError(f"invalid {what} {str(digest)[:80]!r}")
    return digest


class HashingReader:
    """Counts and hashes what it reads; refuses to read past ``size``. ``verify`` checks
    digest and length once the caller has read to the end."""

    def __init__(self, raw: BinaryIO, digest: str | None, size: int | None,
                 check: Callable[[], None] | None = None) -> None:
        self._raw = raw
        self._digest = digest
        self._hasher = hashlib.new(digest.split(":", 1)[0]) if digest else None
        self._size = size
        self._check = check
        self.count = 0

    def read(self, n: int = -1, /) -> bytes:
        if self._check is not None:
            self._check()
        data = self._raw.read(n if n is not None and n >= 0 else 1 << 20)
        if data:
            self.count += len(data)
            if self._size is not None and self.count > self._size:
                raise LayerDigestError(
                    f"layer blob {self._digest} is longer than its {self._size} bytes")
            if self._hasher is not None:
                self._hasher.update(data)
        return data

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def verify(self) -> None:
        if self._size is not None and self.count != self._size:
            raise LayerDigestError(
                f"layer blob {self._digest} has {self.count} bytes, expected {self._size}")
        if self._hasher is not None and self._digest is not None:
            got = f"{self._hasher.name}:{self._hasher.hexdigest()}"
            if got != self._digest:
                raise LayerDigestError(f"layer blob digest mismatch: got {got}, "
                                       f"expected {self._digest}")


def _clean(name: bytes) -> tuple[bytes, ...]:
    """The components of a member name inside the layer; refuses escapes and absurd names."""
    if len(name) > MAX_PATH:
        raise UnsafeLayerError(f"layer tar has a name of {len(name)} bytes")
    if name.startswith(b"/"):
        raise UnsafeLayerError(f"layer tar has an absolute name {_show(name)}")
    parts = tuple(c for c in name.split(b"/") if c not in (b"", b"."))
    for c in parts:
        if c == b"..":
            raise UnsafeLayerError(f"layer tar has a name with '..': {_show(name)}")
        if len(c) > MAX_NAME:
            raise UnsafeLayerError(f"layer tar has a name component of {len(c)} bytes")
    return parts


def _is_root() -> bool:
    return os.geteuid() == 0


class _Extractor:
    """Writes entries under ``root_fd``; owns the parent-directory fd cache."""

    def __init__(self, root_fd: int) -> None:
        self._root = root_fd
        self._cache: OrderedDict[tuple[bytes, ...], int] = OrderedDict()
        self._dirs: dict[tuple[bytes, ...], tuple[int, int, int]] = {}
        self._as_root = _is_root()
        # New nodes are owned by us unless a setgid directory hands down its group; only
        # the root can be setgid while unpacking (directory modes are applied at the end).
        self._born = (os.geteuid(), os.getegid())
        self._inherits_gid = bool(os.fstat(root_fd).st_mode & stat.S_ISGID)
        self.entries = 0

    # -- directories -------------------------------------------------------------------

    def close(self) -> None:
        for fd in self._cache.values():
            os.close(fd)
        self._cache.clear()

    def _forget(self, comps: tuple[bytes, ...]) -> None:
        """The directory ``comps`` was removed: drop the cached fds of it and below (its
        parent's stays valid, callers may hold it)."""
        n = len(comps)
        for key in [k for k in self._cache if k[:n] == comps]:
            os.close(self._cache.pop(key))

    def _trim(self) -> None:
        """Bound the fd cache; only between entries, so no fd in use is ever closed."""
        while len(self._cache) > _FD_CACHE:
            _, old = self._cache.popitem(last=False)
            os.close(old)

    def _dir(self, comps: tuple[bytes, ...], create: bool) -> int:
        """An fd of the directory ``comps``, opened component by component without
        following symlinks; missing ones are created 0755 when ``create``."""
        if not comps:
            return self._root
        fd = self._cache.get(comps)
        if fd is not None:
            self._cache.move_to_end(comps)
            return fd
        parent = self._dir(comps[:-1], create)
        name = comps[-1]
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
            os.mkdir(name, 0o755, dir_fd=parent)
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                where = _show(b"/".join(comps))
                raise UnsafeLayerError(
                    f"layer tar writes through a symlink or non-directory: {where}") from None
            raise
        self._cache[comps] = fd
        return fd

    def _clear_slot(self, parent: int, comps: tuple[bytes, ...], keep_dir: bool) -> bool:
        """Remove whatever is at ``comps`` (tar semantics: a later entry replaces an earlier
        one); an existing directory is kept when a directory replaces it (True)."""
        name = comps[-1]
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            self._forget(comps)
            shutil.rmtree(name, dir_fd=parent)
        else:
            os.unlink(name, dir_fd=parent)
        return False

    # -- metadata ----------------------------------------------------------------------

    def _xattrs(self, target: int | bytes, xattrs: dict[bytes, bytes], follow: bool) -> None:
        for key, value in xattrs.items():
            if key.startswith(b"trusted.overlay.") or key == b"trusted.overlay":
                raise UnsafeLayerError(f"layer tar sets overlay attribute {_show(key)}")
            if not key or b"\0" in key or len(key) > MAX_NAME or len(value) > MAX_XATTR_VALUE:
                raise UnsafeLayerError(f"layer tar has an invalid xattr {_show(key)}")
            try:
                os.setxattr(target, key, value, follow_symlinks=follow)
            except OSError as e:
                if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise

    @staticmethod
    def _times(e: Entry) -> tuple[int, int]:
        atime = e.atime_ns if e.atime_ns is not None and e.atime_ns > e.mtime_ns else e.mtime_ns
        return atime, e.mtime_ns

    def _chown_needed(self, e: Entry) -> bool:
        return self._as_root and (self._inherits_gid or (e.uid, e.gid) != self._born)

    def _create(self, parent: int, comps: tuple[bytes, ...], make: Callable[[], Any]) -> Any:
        """``make()`` the node; if the name is taken, a later tar entry replaces the
        earlier one: remove it and try once more."""
        try:
            return make()
        except FileExistsError:
            self._clear_slot(parent, comps, False)
            return make()

    def _meta_at(self, parent: int, name: bytes, e: Entry, chmod: bool) -> None:
        """Owner, mode, xattrs and times of a non-regular node (never following it)."""
        if self._chown_needed(e):
            os.chown(name, e.uid, e.gid, dir_fd=parent, follow_symlinks=False)
        if chmod:  # just created by us in a directory only we write: not a symlink
            os.chmod(name, e.mode, dir_fd=parent)
        if e.xattrs:
            self._xattrs(f"/proc/self/fd/{parent}/".encode() + name, e.xattrs, False)
        os.utime(name, ns=self._times(e), dir_fd=parent, follow_symlinks=False)

    # -- entries -----------------------------------------------------------------------

    def entry(self, e: Entry, reader: TarReader) -> None:
        self._trim()
        comps = _clean(e.path)
        if not comps:
            if e.type != DIRECTORY:
                raise UnsafeLayerError("layer tar has a non-directory entry for its root")
            self._directory((), self._root, e)
            return
        base = comps[-1]
        wh_kind, hidden = classify_base(base)
        if wh_kind is Kind.AUFS_META or any(is_aufs_meta(c) for c in comps[:-1]):
            return  # AUFS bookkeeping (.wh..wh.plnk etc.), as containerd skips it
        if wh_kind is Kind.OPAQUE:
            fd = self._dir(comps[:-1], True)
            os.setxattr(fd, b"trusted.overlay.opaque", b"y")
            self.entries += 1
            return
        parent = self._dir(comps[:-1], True)
        if wh_kind is Kind.WHITEOUT:
            if hidden in (b"", b".", b".."):
                raise UnsafeLayerError(f"layer tar has an invalid whiteout {_show(e.path)}")
            if not self._as_root:
                raise UnpackError("overlay whiteouts can only be created as root")
            self._create(parent, (*comps[:-1], hidden), lambda: os.mknod(
                hidden, stat.S_IFCHR, os.makedev(0, 0), dir_fd=parent))
            os.chown(hidden, e.uid, e.gid, dir_fd=parent, follow_symlinks=False)
            self.entries += 1
            return
        kind = e.type
        if kind == DIRECTORY:
            try:
                os.mkdir(base, 0o700, dir_fd=parent)
            except FileExistsError:
                if not self._clear_slot(parent, comps, True):
                    os.mkdir(base, 0o700, dir_fd=parent)
            self._directory(comps, self._dir(comps, False), e)
        elif kind == REGULAR:
            fd = self._create(parent, comps, lambda: os.open(
                base, _FILE_FLAGS, 0o600, dir_fd=parent))
            try:
                reader.copy_data(e, fd)
                if self._chown_needed(e):
                    os.fchown(fd, e.uid, e.gid)
                os.fchmod(fd, e.mode)
                if e.xattrs:
                    self._xattrs(fd, e.xattrs, True)
                os.utime(fd, ns=self._times(e))
            finally:
                os.close(fd)
        elif kind == SYMLINK:
            if not e.linkpath or len(e.linkpath) > MAX_PATH:
                raise UnsafeLayerError(f"layer tar has an invalid symlink {_show(e.path)}")
            self._create(parent, comps, lambda: os.symlink(e.linkpath, base, dir_fd=parent))
            self._meta_at(parent, base, e, chmod=False)
        elif kind == HARDLINK:
            self._hardlink(comps, parent, e)
        elif kind in (CHAR, BLOCKDEV, FIFO):
            if kind == FIFO:
                self._create(parent, comps, lambda: os.mkfifo(base, 0o600, dir_fd=parent))
            elif not self._as_root:
                raise UnpackError("device nodes can only be created as root")
            else:
                fmt = stat.S_IFCHR if kind == CHAR else stat.S_IFBLK
                dev = os.makedev(e.devmajor, e.devminor)
                self._create(parent, comps, lambda: os.mknod(
                    base, fmt | 0o600, dev, dir_fd=parent))
            self._meta_at(parent, base, e, chmod=True)
        else:  # the reader lets nothing else through
            raise UnsupportedLayerError(f"unsupported tar entry type {kind!r}")
        self.entries += 1

    def _directory(self, comps: tuple[bytes, ...], fd: int, e: Entry) -> None:
        if self._as_root and (not comps or self._chown_needed(e)):
            os.fchown(fd, e.uid, e.gid)
        if e.xattrs:
            self._xattrs(fd, e.xattrs, True)
        if comps not in self._dirs and len(self._dirs) >= MAX_DIRECTORIES:
            raise UnpackError(f"layer has more than {MAX_DIRECTORIES} directories")
        self._dirs[comps] = (e.mode, *self._times(e))
        if not comps:
            self.entries += 1

    def _hardlink(self, comps: tuple[bytes, ...], parent: int, e: Entry) -> None:
        target = _clean(e.linkpath)
        if not target:
            raise UnsafeLayerError(f"layer tar hardlinks to its root: {_show(e.path)}")
        if target == comps:
            return  # a link to itself: nothing to do
        try:
            tparent = self._dir(target[:-1], False)
            tst = os.stat(target[-1], dir_fd=tparent, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            raise UnsafeLayerError(
                f"layer tar hardlink {_show(e.path)} targets a missing {_show(e.linkpath)}"
            ) from None
        if stat.S_ISDIR(tst.st_mode):
            raise UnsafeLayerError(f"layer tar hardlinks to a directory: {_show(e.path)}")
        self._clear_slot(parent, comps, False)
        # Removing a directory at comps drops the fds below it: resolve the target again.
        tparent = self._dir(target[:-1], False)
        os.link(target[-1], comps[-1], src_dir_fd=tparent, dst_dir_fd=parent,
                follow_symlinks=False)

    def finish(self) -> None:
        """Directory modes and times, once nothing more is written into them."""
        for comps in sorted(self._dirs, key=len, reverse=True):
            self._trim()
            mode, atime, mtime = self._dirs[comps]
            try:
                fd = self._dir(comps, False)
            except (FileNotFoundError, UnsafeLayerError):
                continue  # replaced later in the layer by a non-directory
            os.fchmod(fd, mode)
            os.utime(fd, ns=(atime, mtime))


#: How gzip layers are inflated: ISA-L in a helper thread that runs ahead of the writer
#: (ISA-L releases the GIL), ISA-L inline, or the standard library's zlib (for comparison).
INFLATERS = ("isal-threaded", "isal", "zlib")


def _open_inflated(raw: HashingReader, compression: str, inflater: str) -> Any:
    if compression == "none":
        return raw
    if inflater == "isal-threaded":
        return igzip_threaded.open(raw, "rb", threads=1)
    if inflater == "isal":
        return igzip.IGzipFile(fileobj=raw, mode="rb")  # type: ignore[arg-type]
    return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[arg-type]


def staging_dir(dest: str) -> str:
    parent, base = os.path.split(os.path.abspath(dest))
    return tempfile.mkdtemp(prefix=f"{base}.tmp-", dir=parent)


def unpack_stream(
    stream: BinaryIO,
    dest: str,
    *,
    media_type: str,
    digest: str,
    diff_id: str,
    size: int | None = None,
    verify_compressed: bool = True,
    cancel: threading.Event | None = None,
    inflater: str = "isal-threaded",
) -> UnpackResult:
    """Unpack the layer blob read from ``stream`` to ``dest`` (absent or an empty
    directory). ``verify_compressed=False`` only when the stream was already checked
    against ``digest`` (a spooled download); ``size`` and the diff ID are always checked.

    Raises an ``UnpackError`` subclass (``UnsupportedLayerError``: fall back to the
    runtime's unpack) and leaves ``dest`` as it was."""
    compression = compression_of(media_type)
    if inflater not in INFLATERS:
        raise ValueError(f"unknown inflater {inflater!r}")
    check_digest(digest, "layer digest")
    check_digest(diff_id, "diff ID")

    def check() -> None:
        if cancel is not None and cancel.is_set():
            raise UnpackCancelledError(f"unpack of {digest} cancelled")

    dest = os.path.abspath(dest)
    try:
        with contextlib.suppress(FileNotFoundError):
            if os.listdir(dest):
                raise UnpackError(f"unpack destination {dest} is not empty")
        staging = staging_dir(dest)
    except OSError as e:
        raise UnpackError(f"cannot unpack into {dest}: {e.strerror or e}") from None
    raw = HashingReader(stream, digest if verify_compressed else None, size, check)
    inflated: Any = None
    root_fd = -1
    extractor: _Extractor | None = None
    try:
        root_fd = os.open(staging, _DIR_FLAGS)
        _root_like(root_fd, dest)
        extractor = _Extractor(root_fd)
        inflated = _open_inflated(raw, compression, inflater)
        inp = TarInput(inflated, hashlib.new(diff_id.split(":", 1)[0]), check)
        reader = TarReader(inp)
        while (entry := reader.next()) is not None:
            extractor.entry(entry, reader)
        inp.drain()
        if inflated is not raw:
            inflated.close()
            inflated = None
        raw.drain()
        raw.verify()
        got = f"{inp._hasher.name}:{inp._hasher.hexdigest()}"
        if got != diff_id:
            raise LayerDigestError(f"layer {digest} diff ID mismatch: got {got}, "
                                   f"expected {diff_id}")
        extractor.finish()
        extractor.close()
        os.close(root_fd)
        root_fd = -1
        os.rename(staging, dest)
        return UnpackResult(digest, diff_id, dest, raw.count, inp.total, extractor.entries)
    except BaseException as e:
        if inflated is not None and inflated is not raw:
            with contextlib.suppress(Exception):
                inflated.close()
        if extractor is not None:
            extractor.close()
        if root_fd >= 0:
            os.close(root_fd)
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, UnpackError) and digest not in str(e):
            raise type(e)(f"layer {digest}: {e}") from e
        if isinstance(e, SociError) or not isinstance(e, Exception):
            raise
        raise _as_unpack_error(e, digest) from e


def _root_like(root_fd: int, dest: str) -> None:
    """The staging root replaces ``dest``: give it dest's mode and owner (0755 root when
    ``dest`` does not exist yet); a ``./`` entry in the layer may change them after."""
    try:
        st = os.stat(dest)
        mode, uid, gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
    except FileNotFoundError:
        mode, uid, gid = 0o755, os.geteuid(), os.getegid()
    if _is_root():
        os.fchown(root_fd, uid, gid)
    os.fchmod(root_fd, mode)


def _as_unpack_error(e: Exception, digest: str) -> UnpackError:
    if isinstance(e, EOFError):
        return CorruptLayerError(f"layer {digest} is truncated (compressed stream ends early)")
    if isinstance(e, (ValueError, OverflowError)):
        return CorruptLayerError(f"layer {digest} has an invalid value: {e}")
    if isinstance(e, OSError) and e.errno is None:  # gzip/ISA-L format errors
        return CorruptLayerError(f"layer {digest} is not valid gzip: {e}")
    if isinstance(e, OSError):
        return UnpackError(f"unpacking layer {digest} failed: {e.strerror or e}")
    return UnpackError(f"unpacking layer {digest} failed: {e}")


def unpack_file(path: str, dest: str, **kwargs: Any) -> UnpackResult:
    """``unpack_stream`` of a local blob file (e.g. one already in a content store)."""
    with open(path, "rb", buffering=0) as f:
        return unpack_stream(io.BufferedReader(f, 1 << 20), dest, **kwargs)
