"""The local store under a root directory, laid out as the fork lays it out.

    <root>/content/            an OCI image layout: SOCI indexes, zTOCs, image manifests
    <root>/indexes/<hex>       image manifest digest -> SOCI index digest (the operator's)
    <root>/fetched/<repo>/<hex> the same for indexes fetched from a repository (that one's)
    <root>/artifacts.sqlite3   the artifacts database (rebuildable from content/)
    <root>/cache/spans/        soci-store's verified span cache
    <root>/soci-store.lock     held (flock) by the one soci-store using this root; its pid

The root holds what images contain (zTOCs, cached decompressed spans: an image's
/etc/shadow among them), so it is private to its owner: created 0700, and soci-store
refuses a root owned by someone else and takes group/other access away from its own.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
from pathlib import Path

from soci.artifacts.db import ArtifactsDb
from soci.artifacts.mappings import FetchedIndexes, IndexMappings
from soci.errors import SociError
from soci.oci.layout import OciLayout

#: The same default as upstream's soci-snapshotter-grpc, so CLI and store agree.
DEFAULT_ROOT = "/var/lib/soci-snapshotter-grpc"
#: soci-store's lock on a root, below it.
LOCK_NAME = "soci-store.lock"

log = logging.getLogger("soci.artifacts")


def create_root(root: str | os.PathLike[str]) -> None:
    """Make ``root`` (and missing parents) with the root itself 0700 when it is new."""
    with contextlib.suppress(FileExistsError):
        os.makedirs(root, mode=0o700)


def secure_root(root: str | os.PathLike[str]) -> None:
    """Make sure only we can reach into ``root`` (created when missing).

    A root owned by another user is refused (its owner could read or swap what we serve);
    group or other access on our own root is removed, with a warning: the root directory
    is the one gate in front of everything below it.
    """
    create_root(root)
    try:
        st = os.stat(root)
    except OSError as e:
        raise SociError(f"store root {root}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise SociError(f"store root {root} is not a directory")
    if st.st_uid != os.geteuid():
        raise SociError(f"store root {root} is owned by uid {st.st_uid}, not by this user "
                        f"(uid {os.geteuid()}): refusing to use it")
    if st.st_mode & 0o077:
        log.warning("store root %s was accessible to group/others (mode %o); made it 0700",
                    root, stat.S_IMODE(st.st_mode))
        os.chmod(root, 0o700)


class RootLock:
    """An exclusive ``flock`` on ``<root>/<name>`` (one per kind of daemon) holding the
    holder's pid.

    The kernel drops the lock when the process dies (SIGKILL included), so a restart never
    finds a stale lock; the pid in the file only names the holder in the refusal.
    """

    def __init__(self, root: str | os.PathLike[str], name: str = LOCK_NAME,
                 holder: str = "soci-store") -> None:
        self.path = os.path.join(root, name)
        self.holder = holder  # who holds locks of this name, for the refusal
        self._fd: int | None = None

    def acquire(self) -> RootLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise SociError(f"another {self.holder} (pid {holder}) is using the root "
                                f"{os.path.dirname(self.path)}") from None
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (no unlink race)
            self._fd = None

    def __enter__(self) -> RootLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class LocalStore:
    def __init__(self, root: str | os.PathLike[str] = DEFAULT_ROOT) -> None:
        self.root = Path(root)
        create_root(self.root)
        self.content = OciLayout(self.root / "content", create=True, private=True)
        self.mappings = IndexMappings(self.root / "indexes")
        self.fetched = FetchedIndexes(self.root / "fetched")
        self.db = ArtifactsDb(self.root / "artifacts.sqlite3")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> LocalStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
