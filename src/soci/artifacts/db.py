"""The artifacts database: what indexes and zTOCs exist locally, and what they belong to.

SQLite, so listings and lookups stay cheap with many images, and so several
soci processes can share a root safely. Everything here can be rebuilt from
the content store (``soci rebuild-db``); the database is an index, not the truth.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from soci.fsutil import PRIVATE_DIR, PRIVATE_FILE, make_dirs

_SCHEMA = """
CREATE TABLE IF NOT EXISTS indexes (
    digest          TEXT PRIMARY KEY,
    size            INTEGER NOT NULL,
    media_type      TEXT NOT NULL,
    artifact_type   TEXT NOT NULL,
    manifest_digest TEXT NOT NULL,
    image_digest    TEXT NOT NULL,
    platform        TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    source          TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS indexes_by_manifest ON indexes(manifest_digest);
CREATE TABLE IF NOT EXISTS ztocs (
    digest            TEXT PRIMARY KEY,
    size              INTEGER NOT NULL,
    layer_digest      TEXT NOT NULL,
    layer_media_type  TEXT NOT NULL,
    span_size         INTEGER NOT NULL,
    created_at        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS ztocs_by_layer ON ztocs(layer_digest, span_size);
CREATE TABLE IF NOT EXISTS index_ztocs (
    index_digest TEXT NOT NULL,
    position     INTEGER NOT NULL,
    ztoc_digest  TEXT NOT NULL,
    PRIMARY KEY (index_digest, position)
);
CREATE INDEX IF NOT EXISTS index_ztocs_by_ztoc ON index_ztocs(ztoc_digest);
CREATE TABLE IF NOT EXISTS image_refs (
    ref             TEXT NOT NULL,
    image_digest    TEXT NOT NULL,
    manifest_digest TEXT NOT NULL,
    PRIMARY KEY (ref, manifest_digest)
);
"""


#: Columns added after the first release: (table, column, definition) for ALTER TABLE.
_ADDED_COLUMNS = (("indexes", "source", "TEXT NOT NULL DEFAULT ''"),)


def timestamp(seconds: float | None = None) -> str:
    """RFC 3339 UTC, to the second: now, or ``seconds`` since the epoch."""
    when = dt.datetime.now(dt.UTC) if seconds is None else dt.datetime.fromtimestamp(
        seconds, dt.UTC)
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


def now() -> str:
    return timestamp()


def normal_ref(ref: str) -> str:
    """How an image reference is stored, so ``index list --ref`` finds what ``create`` wrote:
    registry references come already normalised (``app:v1`` is
    ``docker.io/library/app:v1``); an ``oci:``/``oci-archive:`` path is made absolute, so
    ``oci:layout:v1`` and ``oci:/abs/layout:v1`` name one image."""
    for transport in ("oci-archive:", "oci:"):
        if ref.startswith(transport):
            rest = ref[len(transport):]
            path, sep, tag = rest.rpartition(":")
            if not sep or "/" in tag:
                path, sep, tag = rest, "", ""
            return f"{transport}{os.path.abspath(path)}{sep}{tag}" if path else ref
    return ref


@dataclass(frozen=True, slots=True)
class IndexRecord:
    digest: str
    size: int
    media_type: str
    artifact_type: str
    manifest_digest: str
    image_digest: str
    platform: str
    created_at: str
    #: "" for an index the local operator put in the store (``soci create``, ``convert``,
    #: files dropped by hand): trusted for its manifest from any repository. Otherwise
    #: the "registry/repository" it was fetched from: trusted for that repository only
    #: (see FetchedIndexes), never found by manifest digest alone.
    source: str = ""


@dataclass(frozen=True, slots=True)
class ZtocRecord:
    digest: str
    size: int
    layer_digest: str
    layer_media_type: str
    span_size: int
    created_at: str


class ArtifactsDb:
    """The database of one root, safe to share between threads and between processes.

    Each operation borrows a connection of its own from a small pool (one sqlite3
    connection must never carry two threads' statements: their transactions would
    interleave). Writers in this process take turns on a lock, so they queue instead of
    polling SQLite's busy handler; writers in other processes (the CLI next to the daemon)
    are waited for by SQLite's busy timeout. WAL lets readers run beside the writer.
    """

    #: Idle connections kept for reuse; more are opened under load and closed after.
    POOL_SIZE = 8
    #: Seconds to wait for another process's write transaction before giving up.
    BUSY_TIMEOUT = 60.0

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        make_dirs(os.path.dirname(os.path.abspath(self.path)), PRIVATE_DIR)
        # Made private before SQLite opens it: its -wal and -shm files take the same mode.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE))
        self._pool_lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._closed = False
        self._write_lock = threading.Lock()
        self._local = threading.local()  # .conn: the connection this thread holds, if any
        conn = self._open()
        try:
            # WAL persists in the file; the schema is created once, by whoever comes first.
            self._retry_locked(lambda: conn.execute("PRAGMA journal_mode=WAL"))
            self._retry_locked(lambda: conn.executescript(_SCHEMA))
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._idle.append(conn)

    def _open(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are exactly the BEGIN/COMMIT issued below.
        conn = sqlite3.connect(self.path, timeout=self.BUSY_TIMEOUT, isolation_level=None,
                               check_same_thread=False)
        # WAL needs no fsync per commit to stay consistent; the db is rebuildable anyway.
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Add the columns a database made by an earlier version lacks.

        Under the write lock, so two processes opening an old database at once add each
        column once. Indexes recorded before ``source`` existed become local ones: the
        old records cannot tell a fetched index from a created one.
        """
        def missing() -> list[tuple[str, str, str]]:
            have = {(t, row[1]) for t in {t for t, _, _ in _ADDED_COLUMNS}
                    for row in conn.execute(f"PRAGMA table_info({t})")}
            return [a for a in _ADDED_COLUMNS if (a[0], a[1]) not in have]

        if not missing():
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            for table, column, definition in missing():
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _retry_locked(self, step: Callable[[], object]) -> None:
        """Run ``step``, waiting out "database is locked" answers SQLite gives without
        calling its busy handler (switching to WAL while another process opens the file)."""
        deadline = time.monotonic() + self.BUSY_TIMEOUT
        while True:
            try:
                step()
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def close(self) -> None:
        """Close the pooled connections; one still borrowed is closed when given back."""
        with self._pool_lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """A connection for this thread alone (the one it already holds, when nested)."""
        held: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if held is not None:
            yield held
            return
        with self._pool_lock:
            if self._closed:
                raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._open()
        self._local.conn = conn
        try:
            yield conn
        finally:
            self._local.conn = None
            with self._pool_lock:
                keep = (not conn.in_transaction and not self._closed
                        and len(self._idle) < self.POOL_SIZE)
                if keep:
                    self._idle.append(conn)
            if not keep:
                conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it or nothing, never mixed with another's.

        A transaction opened inside another on the same thread joins it.
        """
        with self._connection() as conn:
            if conn.in_transaction:
                yield conn
                return
            with self._write_lock:
                conn.execute("BEGIN IMMEDIATE")  # the write lock now, not at the first write
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                try:
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise

    # -- writing -----------------------------------------------------------------

    def put_ztoc(self, rec: ZtocRecord) -> None:
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO ztocs VALUES (?,?,?,?,?,?)",
                      (rec.digest, rec.size, rec.layer_digest, rec.layer_media_type,
                       rec.span_size, rec.created_at))

    def put_index(self, rec: IndexRecord, ztoc_digests: Sequence[str],
                  refs: Sequence[str] = ()) -> None:
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO indexes (digest, size, media_type, artifact_type,"
                      " manifest_digest, image_digest, platform, created_at, source)"
                      " VALUES (?,?,?,?,?,?,?,?,?)",
                      (rec.digest, rec.size, rec.media_type, rec.artifact_type,
                       rec.manifest_digest, rec.image_digest, rec.platform, rec.created_at,
                       rec.source))
            c.execute("DELETE FROM index_ztocs WHERE index_digest = ?", (rec.digest,))
            c.executemany("INSERT INTO index_ztocs VALUES (?,?,?)",
                          [(rec.digest, i, z) for i, z in enumerate(ztoc_digests)])
            c.executemany("INSERT OR REPLACE INTO image_refs VALUES (?,?,?)",
                          [(normal_ref(ref), rec.image_digest, rec.manifest_digest)
                           for ref in refs])

    def remove_index(self, digest: str) -> list[str]:
        """Forget an index; return the zTOCs no other index uses any more (also forgotten)."""
        with self.transaction() as c:
            ztocs = [r[0] for r in c.execute(
                "SELECT ztoc_digest FROM index_ztocs WHERE index_digest = ?", (digest,))]
            c.execute("DELETE FROM index_ztocs WHERE index_digest = ?", (digest,))
            c.execute("DELETE FROM indexes WHERE digest = ?", (digest,))
            orphans = [z for z in ztocs if c.execute(
                "SELECT 1 FROM index_ztocs WHERE ztoc_digest = ? LIMIT 1", (z,)).fetchone() is None]
            c.executemany("DELETE FROM ztocs WHERE digest = ?", [(z,) for z in orphans])
        return orphans

    def clear(self) -> None:
        with self.transaction() as c:
            for table in ("indexes", "ztocs", "index_ztocs", "image_refs"):
                c.execute(f"DELETE FROM {table}")

    # -- reading -----------------------------------------------------------------

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        """All rows of one query (read whole, so the connection goes back to the pool)."""
        with self._connection() as conn:
            return conn.execute(sql, params).fetchall()

    _INDEX_COLUMNS = ("digest, size, media_type, artifact_type, manifest_digest, image_digest,"
                      " platform, created_at, source")

    def index(self, digest: str) -> IndexRecord | None:
        rows = self._read(f"SELECT {self._INDEX_COLUMNS} FROM indexes WHERE digest = ?",
                          (digest,))
        return IndexRecord(*rows[0]) if rows else None

    def indexes(self, *, manifest_digests: list[str] | None = None,
                platform: str | None = None, local: bool = False) -> list[IndexRecord]:
        """The index records, oldest first; ``local``: only the operator's (source "")."""
        if manifest_digests is None:
            rows = self._read(f"SELECT {self._INDEX_COLUMNS} FROM indexes")
        else:  # by the manifest index (the store asks this on every lookup)
            wanted = list(dict.fromkeys(manifest_digests))
            found: dict[str, tuple] = {}
            for i in range(0, len(wanted), 400):  # well below SQLite's variable limit
                chunk = wanted[i : i + 400]
                marks = ",".join("?" * len(chunk))
                for row in self._read(f"SELECT {self._INDEX_COLUMNS} FROM indexes"
                                      f" WHERE manifest_digest IN ({marks})"
                                      f" OR image_digest IN ({marks})", chunk * 2):
                    found[row[0]] = row
            rows = list(found.values())
        out = sorted((IndexRecord(*r) for r in rows), key=lambda r: (r.created_at, r.digest))
        if platform is not None:
            out = [r for r in out if r.platform == platform]
        if local:
            out = [r for r in out if r.source == ""]
        return out

    def ztoc(self, digest: str) -> ZtocRecord | None:
        rows = self._read("SELECT * FROM ztocs WHERE digest = ?", (digest,))
        return ZtocRecord(*rows[0]) if rows else None

    def ztocs(self) -> list[ZtocRecord]:
        rows = self._read("SELECT * FROM ztocs ORDER BY created_at, digest")
        return [ZtocRecord(*r) for r in rows]

    def ztoc_for_layer(self, layer_digest: str, span_size: int) -> ZtocRecord | None:
        rows = self._read(
            "SELECT * FROM ztocs WHERE layer_digest = ? AND span_size = ? "
            "ORDER BY created_at DESC LIMIT 1", (layer_digest, span_size))
        return ZtocRecord(*rows[0]) if rows else None

    def ztocs_of_index(self, digest: str) -> list[str]:
        return [r[0] for r in self._read(
            "SELECT ztoc_digest FROM index_ztocs WHERE index_digest = ? ORDER BY position",
            (digest,))]

    def manifests_for_ref(self, ref: str) -> list[str]:
        """The image manifests indexed for ``ref`` (as :func:`normal_ref` spells it; rows
        written before refs were normalised match as written too)."""
        return [r[0] for r in self._read(
            "SELECT DISTINCT manifest_digest FROM image_refs WHERE ref IN (?, ?)",
            (normal_ref(ref), ref))]

    def refs(self) -> list[str]:
        """Every image reference an index was created for."""
        return [r[0] for r in self._read("SELECT DISTINCT ref FROM image_refs ORDER BY ref")]
