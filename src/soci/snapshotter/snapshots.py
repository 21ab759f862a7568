"""Snapshots as containerd's overlay snapshotter keeps them, plus lazily served layers.

    <root>/snapshotter/snapshots/<id>/fs     the snapshot's tree (an overlay upper dir), or,
                                             for a lazy layer, a link into the FUSE mount
    <root>/snapshotter/snapshots/<id>/work   overlay's work dir (active snapshots)

When containerd prepares a layer it is about to unpack, it names the snapshot it will
commit (the ``containerd.io/snapshot.ref`` label). If the layer can be served lazily, or
unpacked by us, the snapshot is committed under that name at once and Prepare answers
"already exists": containerd then skips downloading and unpacking the layer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from soci.errors import NotFoundError, SociError
from soci.fsutil import PRIVATE_DIR, make_dirs
from soci.snapshotter import labels as lb
from soci.snapshotter.filters import Filter
from soci.snapshotter.metadata import Kind, MetaStore, Remote, Snapshot

log = logging.getLogger("soci.snapshotter")

#: The longest snapshot key taken (containerd's own keys are a namespace, an id and a
#: chain ID or container ID).
MAX_KEY_BYTES = 4096


class SnapshotNotFound(NotFoundError):
    """No snapshot has that key (or the parent named does not exist)."""


class SnapshotExists(SociError):
    """The key is taken, or the layer the client is about to unpack is already here."""


class SnapshotPrecondition(SociError):
    """The snapshot is not in a state that allows the call (committing a view, removing a
    parent, preparing on an active snapshot)."""


class InvalidSnapshotRequest(SociError):
    """A key, label or filter that cannot be taken."""


@dataclass(frozen=True, slots=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...]


class LazyLayers(Protocol):
    """What serves layers lazily (``soci.snapshotter.remote.RemoteLayers``)."""

    def mount(self, labels: dict[str, str]) -> Remote | None:
        """The layer these labels describe, if it can be served lazily (and is now in use)."""
        ...

    def path(self, remote: Remote) -> str:
        """Where the layer's tree is seen (inside the FUSE mount)."""
        ...

    def release(self, remote: Remote) -> None: ...


class LayerUnpacker(Protocol):
    """What fetches and unpacks layers itself when they cannot be served lazily."""

    def unpack(self, labels: dict[str, str], dest: str) -> bool:
        """Unpack the layer ``labels`` describe into the new directory ``dest``; False when
        this layer is left to containerd (then ``dest`` does not exist)."""
        ...


def _overlay_index_option() -> tuple[str, ...]:
    # As containerd does: turn overlay's inode index off where the kernel has the switch
    # (lower layers are shared by many mounts).
    return ("index=off",) if os.path.exists("/sys/module/overlay/parameters/index") else ()


def disk_usage(path: str) -> tuple[int, int]:
    """(bytes allocated, inodes) below ``path``, counting hard-linked files once."""
    seen: set[tuple[int, int]] = set()
    size = inodes = 0
    stack = [path]
    while stack:
        current = stack.pop()
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        size += st.st_blocks * 512
        inodes += 1
        if stat.S_ISDIR(st.st_mode):
            with contextlib.suppress(FileNotFoundError), os.scandir(current) as it:
                stack.extend(entry.path for entry in it)
    return size, inodes


def _check_key(key: str, what: str = "key") -> None:
    if not key:
        raise InvalidSnapshotRequest(f"snapshot {what} is empty")
    if "\0" in key or len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidSnapshotRequest(f"snapshot {what} {key[:64]!r}... is not a valid key")


def _check_labels(labels: dict[str, str]) -> None:
    for k, v in labels.items():
        if not k:
            raise InvalidSnapshotRequest("label with an empty key")
        if len(k.encode()) + len(v.encode()) > lb.MAX_LABEL_BYTES:
            raise InvalidSnapshotRequest(f"label {k[:64]!r}: key and value exceed "
                                         f"{lb.MAX_LABEL_BYTES} bytes")


class Snapshots:
    """The snapshotter's state: what containerd's snapshots API does, in Python terms."""

    def __init__(self, root: str, lazy: LazyLayers | None = None,
                 unpacker: LayerUnpacker | None = None) -> None:
        self.root = os.path.join(root, "snapshotter")
        self.dir = os.path.join(self.root, "snapshots")
        make_dirs(self.dir, PRIVATE_DIR)
        self.meta = MetaStore(os.path.join(self.root, "metadata.db"))
        self.lazy = lazy
        self.unpacker = unpacker
        self._index_off = _overlay_index_option()
        self._lock = threading.Lock()  # structure changes: one at a time, all short

    def close(self) -> None:
        self.meta.close()

    # -- paths --------------------------------------------------------------------------

    def _fs(self, s: Snapshot) -> str:
        return os.path.join(self.dir, str(s.id), "fs")

    def _work(self, s: Snapshot) -> str:
        return os.path.join(self.dir, str(s.id), "work")

    def _make_dirs(self, sid: int, kind: Kind) -> str:
        """A fresh directory for snapshot ``sid`` (one left by a crash before its row was
        committed is an orphan: replaced)."""
        path = os.path.join(self.dir, str(sid))
        if os.path.lexists(path):
            shutil.rmtree(path, ignore_errors=True)
        os.mkdir(path, PRIVATE_DIR)
        # The tree itself is what containers see as /: 0755 as containerd makes it.
        os.mkdir(os.path.join(path, "fs"), 0o755)
        os.chmod(os.path.join(path, "fs"), 0o755)
        if kind == Kind.ACTIVE:
            os.mkdir(os.path.join(path, "work"), PRIVATE_DIR)
        return path

    def _remove_dir(self, sid: int) -> None:
        path = os.path.join(self.dir, str(sid))
        doomed = os.path.join(self.dir, f"rm-{sid}")
        try:
            os.rename(path, doomed)
        except FileNotFoundError:
            return
        shutil.rmtree(doomed, ignore_errors=True)

    # -- queries ------------------------------------------------------------------------

    def stat(self, key: str) -> Snapshot:
        s = self.meta.get(key)
        if s is None:
            raise SnapshotNotFound(f"snapshot {key!r} does not exist")
        return s

    def list(self, filters: list[str]) -> list[Snapshot]:
        try:
            parsed = Filter.parse(filters)
        except SociError as e:
            raise InvalidSnapshotRequest(str(e)) from None
        return [s for s in self.meta.all() if parsed.matches(_fields(s))]

    def usage(self, key: str) -> tuple[int, int]:
        s = self.stat(key)
        if s.kind == Kind.ACTIVE:
            return disk_usage(self._fs(s))
        return s.size, s.inodes

    def mounts(self, key: str) -> list[Mount]:
        return self._mounts(self.stat(key))

    def _chain(self, parent: str) -> list[str]:
        """The tree of ``parent`` and of its parents, nearest first (overlay's lowerdir)."""
        dirs: list[str] = []
        seen: set[str] = set()
        while parent:
            if parent in seen:
                raise SnapshotPrecondition(f"snapshot {parent!r} is its own ancestor")
            seen.add(parent)
            p = self.stat(parent)
            # A lazy layer's fs is a link into the FUSE mount: short, and free of the ':' in
            # its digest that overlay would take for a separator.
            dirs.append(self._fs(p))
            parent = p.parent
        return dirs

    def _mounts(self, s: Snapshot) -> list[Mount]:
        lower = self._chain(s.parent)
        if s.kind == Kind.COMMITTED:  # not what containerd asks, but answer truthfully
            lower.insert(0, self._fs(s))
            if len(lower) == 1:
                return [Mount("bind", lower[0], ("ro", "rbind"))]
            return [Mount("overlay", "overlay",
                          (*self._index_off, "lowerdir=" + ":".join(lower)))]
        if not lower:
            mode = "ro" if s.kind == Kind.VIEW else "rw"
            return [Mount("bind", self._fs(s), (mode, "rbind"))]
        if s.kind == Kind.ACTIVE:
            return [Mount("overlay", "overlay",
                          (*self._index_off, f"workdir={self._work(s)}",
                           f"upperdir={self._fs(s)}", "lowerdir=" + ":".join(lower)))]
        if len(lower) == 1:
            return [Mount("bind", lower[0], ("ro", "rbind"))]
        return [Mount("overlay", "overlay", (*self._index_off, "lowerdir=" + ":".join(lower)))]

    # -- changes ------------------------------------------------------------------------

    def prepare(self, key: str, parent: str, labels: dict[str, str],
                kind: Kind = Kind.ACTIVE) -> list[Mount]:
        _check_key(key)
        if parent:
            _check_key(parent, "parent")
        _check_labels(labels)
        self._check_new(key, parent)
        target = labels.get(lb.TARGET)
        if target and kind == Kind.ACTIVE:
            _check_key(target, "target")
            self._take_over(target, parent, labels)  # raises SnapshotExists when it did
        with self._lock, self.meta.transaction() as db:
            self._check_new(key, parent)
            s = self._insert(db, key, parent, kind, labels)
            self._make_dirs(s.id, kind)
        log.debug("snapshot %s (%s) prepared on %r", key, kind.name.lower(), parent)
        return self._mounts(s)

    def _check_new(self, key: str, parent: str) -> None:
        if self.meta.get(key) is not None:
            raise SnapshotExists(f"snapshot {key!r} already exists")
        if parent:
            p = self.meta.get(parent)
            if p is None:
                raise SnapshotNotFound(f"parent snapshot {parent!r} does not exist")
            if p.kind != Kind.COMMITTED:
                raise SnapshotPrecondition(f"parent {parent!r} is not a committed snapshot")

    @staticmethod
    def _insert(db: sqlite3.Connection, key: str, parent: str, kind: Kind,
                labels: dict[str, str], **kw: object) -> Snapshot:
        try:
            return MetaStore.insert(db, key, parent, kind, labels, **kw)  # type: ignore[arg-type]
        except sqlite3.IntegrityError:
            raise SnapshotExists(f"snapshot {key!r} already exists") from None

    def _take_over(self, target: str, parent: str, labels: dict[str, str]) -> None:
        """Commit the layer ``target`` names ourselves when we can serve it lazily or unpack
        it; raise SnapshotExists then (containerd's signal to skip the layer)."""
        existing = self.meta.get(target)
        if existing is not None:
            if existing.kind == Kind.COMMITTED and existing.parent == parent:
                raise SnapshotExists(f"target snapshot {target!r} already exists")
            return  # the name is taken by something else: let containerd find out
        stored = dict(labels)
        remote = self.lazy.mount(labels) if self.lazy is not None else None
        if remote is not None:
            stored[lb.REMOTE] = lb.REMOTE_VALUE
            try:
                self._commit_new(target, parent, stored, remote=remote)
            except BaseException:
                self.lazy.release(remote)  # type: ignore[union-attr]
                raise
            log.info("layer %s of %s: served lazily as snapshot %s", remote.digest,
                     labels.get(lb.IMAGE_REF, "?"), target)
            raise SnapshotExists(f"target snapshot {target!r} already exists (lazily served)")
        if self.unpacker is None:
            return
        staging = os.path.join(self.dir, f"unpack-{os.getpid()}-{threading.get_ident()}")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            if not self.unpacker.unpack(labels, staging):
                return
            self._commit_new(target, parent, stored, tree=staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("layer %s: unpacked by soci as snapshot %s", labels.get(lb.LAYER_DIGEST, "?"),
                 target)
        raise SnapshotExists(f"target snapshot {target!r} already exists (unpacked)")

    def _commit_new(self, name: str, parent: str, labels: dict[str, str],
                    remote: Remote | None = None, tree: str | None = None) -> None:
        """A committed snapshot made at once: a lazy layer, or a tree unpacked by us."""
        size, inodes = disk_usage(tree) if tree else (0, 0)
        with self._lock, self.meta.transaction() as db:
            self._check_new(name, parent)
            s = self._insert(db, name, parent, Kind.COMMITTED, labels, remote=remote,
                             size=size, inodes=inodes)
            path = self._make_dirs(s.id, Kind.COMMITTED)
            fs = os.path.join(path, "fs")
            os.rmdir(fs)
            if remote is not None:
                assert self.lazy is not None
                os.symlink(self.lazy.path(remote), fs)
            else:
                assert tree is not None
                os.rename(tree, fs)

    def commit(self, name: str, key: str, labels: dict[str, str]) -> Snapshot:
        _check_key(name, "name")
        _check_labels(labels)
        with self._lock, self.meta.transaction() as db:
            s = self.stat(key)
            if s.kind != Kind.ACTIVE:
                raise SnapshotPrecondition(f"snapshot {key!r} is not active "
                                           f"({s.kind.name.lower()}): it cannot be committed")
            if self.meta.get(name) is not None:
                raise SnapshotExists(f"snapshot {name!r} already exists")
            size, inodes = disk_usage(self._fs(s))
            MetaStore.commit(db, s.id, name, labels, size, inodes)
        shutil.rmtree(self._work(s), ignore_errors=True)
        log.debug("snapshot %s committed as %s (%d bytes, %d inodes)", key, name, size, inodes)
        return self.stat(name)

    def remove(self, key: str) -> None:
        with self._lock, self.meta.transaction() as db:
            s = self.stat(key)
            if self.meta.has_children(key):
                raise SnapshotPrecondition(f"snapshot {key!r} has children: remove them first")
            MetaStore.delete(db, s.id)
        self._remove_dir(s.id)
        if s.remote is not None and self.lazy is not None:
            self.lazy.release(s.remote)
        log.debug("snapshot %s removed", key)

    def update(self, key: str, labels: dict[str, str], paths: list[str]) -> Snapshot:
        """Replace the labels (no paths, or ``labels``), or set/unset single ones
        (``labels.<key>``); nothing else of a snapshot can change."""
        _check_labels(labels)
        with self._lock, self.meta.transaction() as db:
            s = self.stat(key)
            if not paths or "labels" in paths:
                new = dict(labels)
            else:
                new = dict(s.labels)
                for path in paths:
                    if not path.startswith("labels."):
                        raise InvalidSnapshotRequest(f"cannot update field {path!r} of a "
                                                     "snapshot (only labels)")
                    name = path[len("labels."):]
                    if name in labels:
                        new[name] = labels[name]
                    else:
                        new.pop(name, None)
            # Our own mark of a lazy layer stays, whatever a client asks.
            if s.remote is not None:
                new[lb.REMOTE] = lb.REMOTE_VALUE
            MetaStore.set_labels(db, s.id, new)
        return self.stat(key)

    def cleanup(self) -> int:
        """Remove directories no snapshot owns (left by a crash); the number removed."""
        with self._lock:
            ids = self.meta.ids()
            removed = 0
            for name in os.listdir(self.dir):
                if name.isdigit() and int(name) in ids:
                    continue
                path = os.path.join(self.dir, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                removed += 1
        return removed

    def counts(self) -> dict[str, int]:
        """Snapshots by kind, and how many of the committed ones are served lazily."""
        return self.meta.counts()

    def remotes(self) -> list[Snapshot]:
        return [s for s in self.meta.all() if s.remote is not None]


def _fields(s: Snapshot) -> Callable[[tuple[str, ...]], str | None]:
    """The fields of a snapshot a filter can name, as containerd's snapshot adaptor has them."""

    def get(path: tuple[str, ...]) -> str | None:
        if not path:
            return None
        head = path[0]
        if head == "name":
            return s.key
        if head == "parent":
            return s.parent
        if head == "kind":
            return s.kind.name.lower()
        if head == "labels" and len(path) >= 2:
            return s.labels.get(".".join(path[1:]))
        return None

    return get
