"""Snapshot metadata: names, parents, kinds, labels and usage, in SQLite.

Every change is one transaction, and a snapshot's directory is created before the row that
names it is committed (and removed after its row is deleted), so a crash at any point leaves
at most a directory without a row, which ``Snapshots.cleanup`` removes. The database is the
truth: containerd asks for snapshots by key only.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import IntEnum

from soci.fsutil import PRIVATE_FILE

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    key        TEXT NOT NULL UNIQUE,
    parent     TEXT NOT NULL DEFAULT '',
    kind       INTEGER NOT NULL,
    labels     TEXT NOT NULL DEFAULT '{}',
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    size       INTEGER NOT NULL DEFAULT 0,
    inodes     INTEGER NOT NULL DEFAULT 0,
    remote     TEXT
);
CREATE INDEX IF NOT EXISTS snapshots_by_parent ON snapshots(parent);
"""


class Kind(IntEnum):
    """containerd's snapshot kinds, numbered as its API numbers them."""

    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclass(slots=True)
class Remote:
    """Where a lazily served layer comes from: what ``soci.serve`` resolves it by."""

    name: str     # the image the layer was resolved for (see ``remote.lookup_name``)
    digest: str   # the compressed layer's digest

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "digest": self.digest})

    @classmethod
    def from_json(cls, text: str | None) -> Remote | None:
        if not text:
            return None
        doc = json.loads(text)
        return cls(str(doc["name"]), str(doc["digest"]))


@dataclass(slots=True)
class Snapshot:
    id: int
    key: str
    parent: str
    kind: Kind
    labels: dict[str, str] = field(default_factory=dict)
    created_ns: int = 0
    updated_ns: int = 0
    size: int = 0
    inodes: int = 0
    remote: Remote | None = None


def _row(row: sqlite3.Row) -> Snapshot:
    return Snapshot(row["id"], row["key"], row["parent"], Kind(row["kind"]),
                    json.loads(row["labels"]), row["created_ns"], row["updated_ns"],
                    row["size"], row["inodes"], Remote.from_json(row["remote"]))


class MetaStore:
    """The snapshot table. One connection behind a lock: gRPC calls arrive on many threads,
    and every call is short."""

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE)
        os.close(fd)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed snapshot survives power loss
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic change; an exception inside rolls all of it back."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def get(self, key: str) -> Snapshot | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM snapshots WHERE key = ?", (key,)).fetchone()
        return None if row is None else _row(row)

    def all(self) -> list[Snapshot]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM snapshots ORDER BY id").fetchall()
        return [_row(r) for r in rows]

    def ids(self) -> set[int]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT id FROM snapshots")}

    def counts(self) -> dict[str, int]:
        """Snapshots by kind, and how many are served lazily, counted by the database."""
        out = {k.name.lower(): 0 for k in Kind}
        with self._lock:
            for kind, n in self._db.execute("SELECT kind, COUNT(*) FROM snapshots GROUP BY kind"):
                out[Kind(kind).name.lower()] = n
            out["lazy"] = self._db.execute(
                "SELECT COUNT(*) FROM snapshots WHERE remote IS NOT NULL").fetchone()[0]
        return out

    def has_children(self, key: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM snapshots WHERE parent = ? LIMIT 1",
                                    (key,)).fetchone() is not None

    @staticmethod
    def insert(db: sqlite3.Connection, key: str, parent: str, kind: Kind,
               labels: dict[str, str], remote: Remote | None = None, size: int = 0,
               inodes: int = 0) -> Snapshot:
        now = time.time_ns()
        cur = db.execute(
            "INSERT INTO snapshots (key, parent, kind, labels, created_ns, updated_ns, size, "
            "inodes, remote) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key, parent, int(kind), json.dumps(labels, sort_keys=True), now, now, size,
             inodes, None if remote is None else remote.to_json()))
        assert cur.lastrowid is not None
        return Snapshot(cur.lastrowid, key, parent, kind, labels, now, now, size, inodes,
                        remote)

    @staticmethod
    def commit(db: sqlite3.Connection, id: int, name: str, labels: dict[str, str], size: int,
               inodes: int) -> None:
        """Turn an active snapshot into a committed one under its new name."""
        db.execute("UPDATE snapshots SET key = ?, kind = ?, labels = ?, size = ?, inodes = ?, "
                   "updated_ns = ? WHERE id = ?",
                   (name, int(Kind.COMMITTED), json.dumps(labels, sort_keys=True), size,
                    inodes, time.time_ns(), id))

    @staticmethod
    def set_labels(db: sqlite3.Connection, id: int, labels: dict[str, str]) -> None:
        db.execute("UPDATE snapshots SET labels = ?, updated_ns = ? WHERE id = ?",
                   (json.dumps(labels, sort_keys=True), time.time_ns(), id))

    @staticmethod
    def delete(db: sqlite3.Connection, id: int) -> None:
        db.execute("DELETE FROM snapshots WHERE id = ?", (id,))
