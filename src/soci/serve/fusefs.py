"""The layer filesystem both front ends mount, in the layout containers/storage expects of an
Additional Layer Store (the snapshotter mounts it privately and links its snapshots into it):

    <mnt>/pool                          -> symlink to the store's root
    <mnt>/<base64(image ref)>/<layer digest>/
        diff/                           the layer's tree (lazily read)
        info                            containers/storage Layer JSON
        blob                            the compressed layer (downloaded whole on first read)
        use                             create() = one more user (answers ENOENT)
    rmdir <ref dir>/<layer digest>      one user fewer (answers ENOENT)

A layer without a zTOC answers ENOENT for ``diff``, ``info`` and ``blob`` so
containers/storage pulls it the ordinary way; so does a layer that cannot be
resolved at all (registry unreachable, index or zTOC refused). EIO is kept for
file data that cannot be read or fails verification once a layer is served.
Nothing here is writable.
"""

from __future__ import annotations

import base64
import binascii
import errno
import functools
import logging
import os
import re
import signal
import stat
import time
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass

import pyfuse3
import trio

from soci.errors import SociError
from soci.fs.spans import drain_workers
from soci.fs.tree import ROOT as TREE_ROOT
from soci.fs.tree import Node
from soci.serve.layers import Layer, LayerManager
from soci.serve.metrics import Metrics

log = logging.getLogger("soci.serve.fs")

_BLOCK = 4096
_DIR_MODE = stat.S_IFDIR | 0o500
_FILE_MODE = stat.S_IFREG | 0o400
_LINK_MODE = stat.S_IFLNK | 0o400
_DIGEST = re.compile(rb"sha256:[0-9a-f]{64}")


@dataclass(slots=True)
class _Synthetic:
    kind: str              # "refdir", "layerdir", "info", "blob", "pool"
    ref: str = ""
    digest: str = ""
    data: bytes = b""
    layer: Layer | None = None


def _timed(op: str):
    """Count and time a FUSE operation in the store's metrics."""

    def decorate(handler):
        @functools.wraps(handler)
        async def timed(self: LayerFS, *args: object) -> object:
            with self.metrics.fuse_op(op):
                return await handler(self, *args)

        return timed

    return decorate


class LayerFS(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, manager: LayerManager, metrics: Metrics,
                 attr_timeout: float = 3600.0) -> None:
        super().__init__()
        self.manager = manager
        self.attr_timeout = attr_timeout  # the layers are immutable: the kernel may cache
        self.metrics = metrics
        self._next = pyfuse3.ROOT_INODE + 1
        self._synthetic: dict[int, _Synthetic] = {}
        self._children: dict[int, dict[bytes, int]] = {pyfuse3.ROOT_INODE: {}}
        self._tree_bases: list[int] = []       # sorted first inode of each mounted tree
        self._tree_layers: list[Layer | None] = []  # None: released, its inodes are stale
        self._diff_inode: dict[tuple, int] = {}  # Layer.key -> inode of its diff root
        self._started = time.time_ns()
        self.ops = 0
        self.reads = 0

    # -- inode bookkeeping -------------------------------------------------------------

    def _new(self, parent: int, name: bytes, item: _Synthetic) -> int:
        ino = self._next
        self._next += 1
        self._synthetic[ino] = item
        self._children.setdefault(parent, {})[name] = ino
        if item.kind in ("refdir", "layerdir"):
            self._children[ino] = {}
        return ino

    def _tree(self, ino: int) -> tuple[Layer, Node, int] | None:
        i = bisect_right(self._tree_bases, ino) - 1
        if i < 0:
            return None
        layer = self._tree_layers[i]
        if layer is None:
            return None
        local = ino - self._tree_bases[i] + TREE_ROOT
        if local >= len(layer.tree.nodes):
            return None
        try:
            return layer, layer.tree.node(local), local
        except KeyError:
            return None

    def _mount_tree(self, layer: Layer) -> int:
        ino = self._diff_inode.get(layer.key)
        if ino is None:
            ino = self._next
            self._next += len(layer.tree.nodes)
            self._tree_bases.append(ino)
            self._tree_layers.append(layer)
            self._diff_inode[layer.key] = ino
        return ino

    def release_idle(self, grace: float) -> None:
        """Unmount layers podman no longer uses; their inode numbers are never reused."""
        for layer in self.manager.evict_idle(grace):
            ino = self._diff_inode.pop(layer.key, None)
            if ino is not None:
                self._tree_layers[self._tree_bases.index(ino)] = None
            for children in self._children.values():
                for name, child in list(children.items()):
                    item = self._synthetic.get(child)
                    if child == ino or (item is not None and item.layer is layer):
                        del children[name]
                        self._synthetic.pop(child, None)
            log.info("layer %s: released after %.0f s without users (spans stay cached)",
                     layer.digest, grace)

    # -- attributes --------------------------------------------------------------------

    def _attr(self, ino: int, mode: int, size: int = 0, nlink: int = 1, uid: int = 0,
              gid: int = 0, rdev: int = 0, mtime_ns: int | None = None,
              timeout: float = 1.0) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode = mode
        a.st_nlink = nlink
        a.st_uid, a.st_gid = uid, gid
        a.st_rdev = rdev
        a.st_size = size
        a.st_blksize = _BLOCK
        a.st_blocks = (size + 511) // 512
        t = self._started if mtime_ns is None else mtime_ns
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = t
        a.entry_timeout = timeout
        a.attr_timeout = timeout
        return a

    def _node_attr(self, ino: int, node: Node) -> pyfuse3.EntryAttributes:
        return self._attr(ino, node.mode, node.size, node.nlink, node.uid, node.gid, node.rdev,
                          node.mtime_ns, self.attr_timeout)

    def _getattr(self, ino: int) -> pyfuse3.EntryAttributes:
        if ino == pyfuse3.ROOT_INODE:
            return self._attr(ino, _DIR_MODE, nlink=2)
        item = self._synthetic.get(ino)
        if item is not None:
            if item.kind in ("refdir", "layerdir"):
                return self._attr(ino, _DIR_MODE, nlink=2)
            if item.kind == "pool":
                return self._attr(ino, _LINK_MODE, len(self.manager.store.root.as_posix()))
            if item.kind == "info":
                return self._attr(ino, _FILE_MODE, len(item.data))
            if item.kind == "blob":
                assert item.layer is not None
                return self._attr(ino, _FILE_MODE, item.layer.size)
        found = self._tree(ino)
        if found is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        _, node, _ = found
        return self._node_attr(ino, node)

    @_timed("getattr")
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.ops += 1
        return self._getattr(inode)

    # -- lookup ------------------------------------------------------------------------

    @_timed("lookup")
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.ops += 1
        known = self._children.get(parent_inode, {}).get(name)
        if known is not None:
            return self._getattr(known)
        if parent_inode == pyfuse3.ROOT_INODE:
            return self._lookup_root(name)
        item = self._synthetic.get(parent_inode)
        if item is not None and item.kind == "refdir":
            if not _DIGEST.fullmatch(name):
                raise pyfuse3.FUSEError(errno.ENOENT)
            ino = self._new(parent_inode, name, _Synthetic("layerdir", item.ref, name.decode()))
            return self._getattr(ino)
        if item is not None and item.kind == "layerdir":
            return await self._lookup_layer(parent_inode, item, name)
        found = self._tree(parent_inode)
        if found is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        layer, _, local = found
        child = layer.tree.lookup(local, name)
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        ino = self._diff_inode[layer.key] + child - TREE_ROOT
        return self._node_attr(ino, layer.tree.node(child))

    def _lookup_root(self, name: bytes) -> pyfuse3.EntryAttributes:
        if name == b"pool":
            return self._getattr(self._new(pyfuse3.ROOT_INODE, name, _Synthetic("pool")))
        # containers/storage names images in standard base64; the snapshotter, whose names
        # must not hold a '/', in the URL-safe alphabet.
        alphabet = b"-_" if b"-" in name or b"_" in name else b"+/"
        try:
            ref = base64.b64decode(name, altchars=alphabet, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        ino = self._new(pyfuse3.ROOT_INODE, name, _Synthetic("refdir", ref))
        return self._getattr(ino)

    async def _lookup_layer(self, parent: int, item: _Synthetic,
                            name: bytes) -> pyfuse3.EntryAttributes:
        if name not in (b"diff", b"info", b"blob"):
            raise pyfuse3.FUSEError(errno.ENOENT)  # "use", "diff1", anything else
        # Whatever keeps the layer from being resolved (registry down, no or bad index,
        # a zTOC refused) means "not here": podman then pulls the layer itself. EIO would
        # fail the pull instead.
        try:
            layer = await trio.to_thread.run_sync(self.manager.get, item.ref, item.digest)
        except SociError as e:
            log.warning("image %s layer %s: cannot resolve, not served lazily (pulled "
                        "normally): %s", item.ref, item.digest, e)
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except Exception:
            log.exception("image %s layer %s: unexpected error resolving it, not served "
                          "lazily (pulled normally)", item.ref, item.digest)
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        if layer is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if name == b"diff":
            ino = self._mount_tree(layer)
            self._children[parent][name] = ino
            return self._getattr(ino)
        kind = name.decode()
        ino = self._new(parent, name, _Synthetic(kind, item.ref, item.digest,
                                                 layer.info(item.digest) if kind == "info"
                                                 else b"", layer))
        return self._getattr(ino)

    # -- the store's reference counting ------------------------------------------------

    @_timed("create")
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                           pyfuse3.EntryAttributes]:
        item = self._synthetic.get(parent_inode)
        if item is not None and item.kind == "layerdir" and name == b"use":
            users = self.manager.use(item.ref, item.digest)
            log.info("image %s layer %s: in use (users=%d)", item.ref, item.digest, users)
            raise pyfuse3.FUSEError(errno.ENOENT)
        raise pyfuse3.FUSEError(errno.EROFS)

    @_timed("rmdir")
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        item = self._synthetic.get(parent_inode)
        if item is not None and item.kind == "refdir":
            users = self.manager.release(item.ref, name.decode(errors="replace"))
            log.info("image %s layer %s: released (users=%d)", item.ref,
                     name.decode(errors="replace"), users)
            raise pyfuse3.FUSEError(errno.ENOENT)
        raise pyfuse3.FUSEError(errno.EROFS)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    # -- directories -------------------------------------------------------------------

    @_timed("opendir")
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self.ops += 1
        if inode in self._children:
            return inode
        found = self._tree(inode)
        if found is None or found[1].children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_timed("readdir")
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        self.ops += 1
        if fh in self._children:
            entries = sorted(self._children[fh].items())
            for i, (name, ino) in enumerate(entries[start_id:], start_id):
                if not pyfuse3.readdir_reply(token, name, self._getattr(ino), i + 1):
                    return
            return
        found = self._tree(fh)
        if found is None:
            return
        layer, node, _ = found
        base = self._diff_inode[layer.key] - TREE_ROOT
        assert node.children is not None
        items = list(node.children.items())
        for i in range(start_id, len(items)):
            name, local = items[i]
            attr = self._node_attr(base + local, layer.tree.node(local))
            if not pyfuse3.readdir_reply(token, name, attr, i + 1):
                return

    async def releasedir(self, fh: int) -> None:
        pass

    # -- files -------------------------------------------------------------------------

    @_timed("readlink")
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        self.ops += 1
        item = self._synthetic.get(inode)
        if item is not None and item.kind == "pool":
            return os.fsencode(self.manager.store.root)
        found = self._tree(inode)
        if found is None or not stat.S_ISLNK(found[1].mode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return found[1].target

    @_timed("open")
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        self.ops += 1
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        item = self._synthetic.get(inode)
        if item is None:
            found = self._tree(inode)
            if found is None or not stat.S_ISREG(found[1].mode):
                raise pyfuse3.FUSEError(errno.EISDIR if found else errno.ENOENT)
        # The layer never changes: keep the kernel's page cache across opens.
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    @_timed("read")
    async def read(self, fh: int, off: int, size: int) -> bytes:
        self.ops += 1
        self.reads += 1
        item = self._synthetic.get(fh)
        if item is not None:
            if item.kind == "info":
                return item.data[off : off + size]
            assert item.layer is not None
            layer = item.layer
            try:
                return await trio.to_thread.run_sync(
                    layer.read_blob, self.manager.client, self.manager.store, off, size)
            except (SociError, OSError) as e:
                log.warning("layer %s: blob read failed: %s", layer.digest, e)
                raise pyfuse3.FUSEError(errno.EIO) from None
        found = self._tree(fh)
        if found is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        layer, node, _ = found
        if off >= node.size:
            return b""
        size = min(size, node.size - off)
        # Memory and disk-cache hits are answered here, on the FUSE loop (one pread at
        # most); anything that must be fetched or inflated goes to a worker thread.
        data = layer.spans.read_cached(node.offset + off, size, node.offset + node.size)
        if data is not None:
            return data
        try:
            return await trio.to_thread.run_sync(layer.spans.read, node.offset + off, size,
                                                 node.offset + node.size)
        except SociError as e:
            log.warning("layer %s: read failed: %s", layer.digest, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("layer %s: unexpected read error", layer.digest)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def release(self, fh: int) -> None:
        pass

    # -- xattrs and statfs -------------------------------------------------------------

    @_timed("getxattr")
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        found = self._tree(inode)
        value = (found[1].xattrs or {}).get(name) if found else None
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    @_timed("listxattr")
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        found = self._tree(inode)
        return list((found[1].xattrs or {}).keys()) if found else []

    @_timed("statfs")
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = _BLOCK
        total = sum(layer.size for layer in self.manager.layers())
        s.f_blocks = max(total // _BLOCK, 1)
        s.f_bfree = s.f_bavail = 0
        s.f_files = sum(len(layer.tree) for layer in self.manager.layers()) + len(self._synthetic)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        pass  # inodes live as long as the daemon: the layers are immutable


def set_read_ahead(mountpoint: str, kb: int) -> None:
    """Let the kernel read ahead ``kb`` KiB on the FUSE mount at ``mountpoint``.

    The kernel caps a FUSE mount's read-ahead at what its INIT handshake offered (128 KiB)
    and sends buffered reads as read-ahead requests; a larger window means fewer, larger
    requests (up to 1 MiB each: libfuse asks for 256 pages) and several in flight, which
    the daemon answers on both cores. Only root may change it (sysfs); failing is harmless.
    Must not run on the FUSE loop's thread: the stat is answered by that loop.
    """
    try:
        st = os.stat(mountpoint)
        path = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"
        with open(path, "w") as f:
            f.write(f"{kb}\n")
        log.debug("read-ahead of %s: %d KiB", mountpoint, kb)
    except OSError as e:
        log.info("cannot set the read-ahead of %s to %d KiB: %s", mountpoint, kb, e)


def serve_until_signal(fs: LayerFS, release_grace_sec: float,
                       on_ready: Callable[[], None], mountpoint: str | None = None,
                       read_ahead_kb: int = 0) -> None:
    """Serve the mounted ``fs`` until SIGINT or SIGTERM, unmounting layers nobody has used
    for ``release_grace_sec`` on the way (pyfuse3.init must have been called).

    ``on_ready`` (log "serving", tell systemd) runs once the signals are ours: a SIGTERM sent
    as soon as the daemon says it is ready must stop it cleanly, not kill it. With a
    ``mountpoint`` and ``read_ahead_kb``, the mount's read-ahead is set once it answers."""

    async def release_idle_layers() -> None:
        while True:
            await trio.sleep(max(release_grace_sec / 4, 0.25))
            fs.release_idle(release_grace_sec)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            nursery.start_soon(release_idle_layers)
            if mountpoint is not None and read_ahead_kb > 0:
                nursery.start_soon(functools.partial(
                    trio.to_thread.run_sync, set_read_ahead, mountpoint, read_ahead_kb,
                    abandon_on_cancel=True))
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                on_ready()
                async for signum in signals:
                    log.info("signal %d: stopping", signum)
                    nursery.cancel_scope.cancel()
                    return

    trio.run(main)
    # Spans already verified and inflated are written to the disk cache after the reads
    # that loaded them returned: let those writes land (bounded: a read-ahead stuck on the
    # registry must not hold up the stop).
    if not drain_workers(10.0):
        log.warning("stopping with span jobs still running (their spans are fetched again "
                    "next time)")
