"""The artifacts database: what indexes and zTOCs exist locally, and what they belong to.

SQLite, so listings and lookups stay cheap with many images, and so several
soci processes can share a root safely. Everything here can be rebuilt from
the content store (``soci rebuild-db``); the database is an index, not the truth.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

_SCHEMA = """
CREATE TABLE IF NOT EXISTS indexes (
    digest          TEXT PRIMARY KEY,
    size            INTEGER NOT NULL,
    media_type      TEXT NOT NULL,
    artifact_type   TEXT NOT NULL,
    manifest_digest TEXT NOT NULL,
    image_digest    TEXT NOT NULL,
    platform        TEXT NOT NULL,
    created_at      TEXT NOT NULL
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


def timestamp(seconds: float | None = None) -> str:
    """RFC 3339 UTC, to the second: now, or ``seconds`` since the epoch."""
    when = dt.datetime.now(dt.UTC) if seconds is None else dt.datetime.fromtimestamp(
        seconds, dt.UTC)
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


def now() -> str:
    return timestamp()


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


@dataclass(frozen=True, slots=True)
class ZtocRecord:
    digest: str
    size: int
    layer_digest: str
    layer_media_type: str
    span_size: int
    created_at: str


class ArtifactsDb:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                                     check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    # -- writing -----------------------------------------------------------------

    def put_ztoc(self, rec: ZtocRecord) -> None:
        self._conn.execute("INSERT OR REPLACE INTO ztocs VALUES (?,?,?,?,?,?)",
                           (rec.digest, rec.size, rec.layer_digest, rec.layer_media_type,
                            rec.span_size, rec.created_at))

    def put_index(self, rec: IndexRecord, ztoc_digests: Sequence[str],
                  refs: Sequence[str] = ()) -> None:
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO indexes VALUES (?,?,?,?,?,?,?,?)",
                      (rec.digest, rec.size, rec.media_type, rec.artifact_type,
                       rec.manifest_digest, rec.image_digest, rec.platform, rec.created_at))
            c.execute("DELETE FROM index_ztocs WHERE index_digest = ?", (rec.digest,))
            c.executemany("INSERT INTO index_ztocs VALUES (?,?,?)",
                          [(rec.digest, i, z) for i, z in enumerate(ztoc_digests)])
            c.executemany("INSERT OR REPLACE INTO image_refs VALUES (?,?,?)",
                          [(ref, rec.image_digest, rec.manifest_digest) for ref in refs])

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

    def index(self, digest: str) -> IndexRecord | None:
        row = self._conn.execute("SELECT * FROM indexes WHERE digest = ?", (digest,)).fetchone()
        return IndexRecord(*row) if row else None

    def indexes(self, *, manifest_digests: list[str] | None = None,
                platform: str | None = None) -> list[IndexRecord]:
        rows = self._conn.execute("SELECT * FROM indexes ORDER BY created_at, digest").fetchall()
        out = [IndexRecord(*r) for r in rows]
        if manifest_digests is not None:
            wanted = set(manifest_digests)
            out = [r for r in out if r.manifest_digest in wanted or r.image_digest in wanted]
        if platform is not None:
            out = [r for r in out if r.platform == platform]
        return out

    def ztoc(self, digest: str) -> ZtocRecord | None:
        row = self._conn.execute("SELECT * FROM ztocs WHERE digest = ?", (digest,)).fetchone()
        return ZtocRecord(*row) if row else None

    def ztocs(self) -> list[ZtocRecord]:
        rows = self._conn.execute("SELECT * FROM ztocs ORDER BY created_at, digest").fetchall()
        return [ZtocRecord(*r) for r in rows]

    def ztoc_for_layer(self, layer_digest: str, span_size: int) -> ZtocRecord | None:
        row = self._conn.execute(
            "SELECT * FROM ztocs WHERE layer_digest = ? AND span_size = ? "
            "ORDER BY created_at DESC LIMIT 1", (layer_digest, span_size)).fetchone()
        return ZtocRecord(*row) if row else None

    def ztocs_of_index(self, digest: str) -> list[str]:
        return [r[0] for r in self._conn.execute(
            "SELECT ztoc_digest FROM index_ztocs WHERE index_digest = ? ORDER BY position",
            (digest,))]

    def manifests_for_ref(self, ref: str) -> list[str]:
        return [r[0] for r in self._conn.execute(
            "SELECT manifest_digest FROM image_refs WHERE ref = ?", (ref,))]
