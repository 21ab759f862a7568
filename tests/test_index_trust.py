"""Whom a SOCI index is trusted for (issue 8 item 6's class).

An index fetched from a repository's referrers is that repository's owner's choice: it is
used for that repository's image only, also after a restart and ``soci rebuild-db``. An
index the local operator made or placed is used for its manifest from any repository, and
one named by the manifest's own (digest-pinned) annotation wherever that manifest is.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from images import files_layer, write_image
from registryd import Registry, push_layout
from soci.artifacts import ArtifactsDb, LocalStore
from soci.index.discover import discover_index
from soci.oci.descriptor import Descriptor, Manifest
from soci.registry import Reference, RegistryClient
from storeenv import StoreDaemon


def soci(root: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "soci.cli", "--plain-http", "--root", str(root),
                           *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def manifest_of(client: RegistryClient, ref: str) -> tuple[Reference, Descriptor, Manifest]:
    r = Reference.parse(ref)
    got = client.get_manifest(r)
    return r, Descriptor(got.media_type, got.digest, len(got.data)), Manifest.parse(got.data)


@pytest.fixture
def repos(tmp_path: Path) -> Iterator[tuple[Registry, str, str, str]]:
    """One image in good/img (no SOCI index) and evil/img (an index pushed there)."""
    with Registry() as reg:
        write_image(tmp_path / "img", "v1", [files_layer({"etc/motd": b"hello\n"})])
        push_layout(tmp_path / "img", reg.host, "good/img:v1", tag="v1")
        push_layout(tmp_path / "img", reg.host, "evil/img:v1", tag="v1")
        good, evil = f"{reg.host}/good/img:v1", f"{reg.host}/evil/img:v1"
        soci(tmp_path / "maker", "create", "--min-layer-size", "0", evil)
        soci(tmp_path / "maker", "push", evil)
        layer = manifest_of(RegistryClient(plain_http=True), good)[2].layers[0].digest
        yield reg, good, evil, layer


def _served_lazily(daemon: StoreDaemon, ref: str, layer: str) -> bool:
    try:
        os.listdir(daemon.layer_dir(ref, layer) / "diff")
    except FileNotFoundError as e:
        assert e.errno == errno.ENOENT
        return False
    return True


def test_fetched_index_stays_with_its_repository_after_restart_and_rebuild_db(
        repos: tuple[Registry, str, str, str], tmp_path: Path) -> None:
    """evil/img's index, fetched by one soci-store run, must not serve good/img in the next
    one, nor after ``soci rebuild-db`` re-registered the content store's indexes."""
    _, good, evil, layer = repos
    root = tmp_path / "root"
    with StoreDaemon(root, tmp_path / "mnt") as daemon:
        assert _served_lazily(daemon, evil, layer)
    for step in ("restart", "rebuild-db"):
        if step == "rebuild-db":
            assert "found 1 SOCI indexes" in soci(root, "rebuild-db")
        with StoreDaemon(root, tmp_path / "mnt") as daemon:
            assert not _served_lazily(daemon, good, layer), step
            assert _served_lazily(daemon, evil, layer), step  # its own repository's, kept

    evil_repo = evil.rsplit(":", 1)[0]
    assert [r["source"] for r in json.loads(soci(root, "index", "ls", "--json"))] == [
        evil_repo]
    assert not (root / "indexes").exists() or os.listdir(root / "indexes") == []
    fetched = root / "fetched"
    for path in [fetched, *fetched.rglob("*")]:
        want = 0o700 if path.is_dir() else 0o600
        assert stat.S_IMODE(path.stat().st_mode) == want, path


def test_the_operators_index_is_used_from_every_repository(
        repos: tuple[Registry, str, str, str], tmp_path: Path) -> None:
    """``soci create`` in the store's root is the local operator's choice: it holds for the
    manifest whichever repository the image is pulled from, and survives rebuild-db."""
    _, good, evil, layer = repos
    root = tmp_path / "root"
    soci(root, "create", "--min-layer-size", "0", good)
    soci(root, "rebuild-db")
    with StoreDaemon(root, tmp_path / "mnt") as daemon:
        assert _served_lazily(daemon, good, layer)
        assert _served_lazily(daemon, evil, layer)
    assert [r["source"] for r in json.loads(soci(root, "index", "ls", "--json"))] == [""]


def test_index_named_by_the_manifest_is_used_for_every_copy_of_it(
        repos: tuple[Registry, str, str, str], tmp_path: Path) -> None:
    """A v2 index is pinned by the image manifest's own annotation: fetched through one
    repository it serves a copy of that manifest in another, while a referrer does not."""
    reg, good, evil, _ = repos
    converted_a, converted_b = f"{reg.host}/a/img:soci", f"{reg.host}/b/img:soci"
    soci(tmp_path / "maker", "convert", "--min-layer-size", "0", good, converted_a)
    client = RegistryClient(plain_http=True)
    top = json.loads(client.get_manifest(Reference.parse(converted_a)).data)
    child = top["manifests"][0]["digest"]
    # b/img holds the same image manifest (and so its annotation), not the index.
    proc = subprocess.run(["skopeo", "copy", "--quiet", "--preserve-digests",
                           "--src-tls-verify=false", "--dest-tls-verify=false",
                           f"docker://{converted_a.rsplit(':', 1)[0]}@{child}",
                           f"docker://{converted_b}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    with LocalStore(tmp_path / "fresh") as store:
        for ref_text in (converted_a, converted_b):
            ref, desc, manifest = manifest_of(client, ref_text.rsplit(":", 1)[0] + "@" + child)
            got = discover_index(store, client, ref, desc, manifest)
            assert got is not None and got.where == "image annotation", ref_text
        # The referrer fetched for evil/img is not used for good/img (same manifest).
        ref, desc, manifest = manifest_of(client, evil)
        assert discover_index(store, client, ref, desc, manifest) is not None
        ref, desc, manifest = manifest_of(client, good)
        assert discover_index(store, client, ref, desc, manifest) is None


def test_old_database_gains_the_source_column(tmp_path: Path) -> None:
    """A database made before index provenance existed opens, its records local ones."""
    path = tmp_path / "artifacts.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE indexes (digest TEXT PRIMARY KEY, size INTEGER NOT NULL,
            media_type TEXT NOT NULL, artifact_type TEXT NOT NULL,
            manifest_digest TEXT NOT NULL, image_digest TEXT NOT NULL,
            platform TEXT NOT NULL, created_at TEXT NOT NULL);
        INSERT INTO indexes VALUES ('sha256:aa', 1, 'm', 'a', 'sha256:bb', 'sha256:bb',
                                    'linux/amd64', '2024-01-01T00:00:00Z');
    """)
    conn.close()
    for _ in range(2):  # the second open finds the column there
        db = ArtifactsDb(path)
        try:
            [rec] = db.indexes(manifest_digests=["sha256:bb"], local=True)
            assert (rec.digest, rec.source) == ("sha256:aa", "")
        finally:
            db.close()
