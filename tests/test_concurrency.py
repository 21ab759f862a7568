"""Many threads and processes on one root: the artifacts db, and index discovery in the store."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from images import files_layer, write_image
from registryd import FaultProxy, Registry, push_layout
from soci.artifacts import ArtifactsDb, IndexRecord, ZtocRecord
from soci.index.discover import DiscoveryFlights
from storeenv import StoreDaemon, soci


def _digest(*what: object) -> str:
    return "sha256:" + hashlib.sha256(repr(what).encode()).hexdigest()


def _put(db: ArtifactsDb, writer: str, n: int) -> None:
    """One index with three zTOCs of its own and one shared by every index."""
    index = _digest("index", writer, n)
    ztocs = [_digest("ztoc", writer, n, i) for i in range(3)]
    for z in ztocs:
        db.put_ztoc(ZtocRecord(z, 100, _digest("c", n), "tar+gzip", 1 << 20,
                               "2026-01-01T00:00:00Z"))
    db.put_index(IndexRecord(index, 500, "manifest", "soci", _digest("d", n), _digest("d", n),
                             "linux/amd64", "2026-01-01T00:00:00Z"),
                 [*ztocs, _digest("e", 0)], refs=[f"r/{writer}:{n}"])


def _check_consistent(path: Path, writers: list[str], count: int) -> None:
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("SELECT count(*) FROM indexes").fetchone() == (len(writers) * count,)
        assert conn.execute("SELECT count(*) FROM ztocs").fetchone() == (3 * len(writers) * count,)
        assert conn.execute("SELECT count(*) FROM image_refs").fetchone() == (
            len(writers) * count,)
        # every index lists its four zTOCs at positions 0..3, no more, no fewer
        rows = conn.execute("SELECT index_digest, count(*), min(position), max(position) "
                            "FROM index_ztocs GROUP BY index_digest").fetchall()
        assert len(rows) == len(writers) * count
        assert all(r[1:] == (4, 0, 3) for r in rows)
    finally:
        conn.close()


def test_1200_concurrent_put_index_from_many_threads(tmp_path: Path) -> None:
    """One db object shared by 100 threads, all writing at once (and reading between)."""
    db = ArtifactsDb(tmp_path / "artifacts.sqlite3")
    threads, each = 100, 12
    start = threading.Barrier(threads)
    failures: list[BaseException] = []

    def writer(t: int) -> None:
        start.wait()
        for n in range(each):
            try:
                _put(db, f"t{t}", n)
                assert db.ztocs_of_index(db.indexes(
                    manifest_digests=[_digest("d", n)])[0].digest)[-1] == _digest("e", 0)
            except BaseException as e:
                failures.append(e)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(writer, range(threads)))
    assert failures == [], f"{len(failures)} of {threads * each} failed: {failures[0]!r}"
    assert len(db.indexes()) == threads * each
    db.close()
    _check_consistent(tmp_path / "artifacts.sqlite3", [f"t{t}" for t in range(threads)], each)


def test_a_failed_transaction_leaves_nothing_and_the_db_usable(tmp_path: Path) -> None:
    db = ArtifactsDb(tmp_path / "artifacts.sqlite3")
    with pytest.raises(RuntimeError), db.transaction() as c:
        c.execute("DELETE FROM indexes")
        _put(db, "inner", 0)  # joins the outer transaction, so it is undone with it
        raise RuntimeError("abandon")
    assert db.indexes() == [] and db.ztocs() == []
    _put(db, "after", 0)
    assert len(db.indexes()) == 1
    db.close()


_WRITER = """
import sys, time
sys.path.insert(0, {tests!r})
from pathlib import Path
from soci.artifacts import ArtifactsDb
from test_concurrency import _put
go = Path({go!r})
(go.parent / ("ready-" + sys.argv[1])).touch()
while not go.exists():
    time.sleep(0.005)
db = ArtifactsDb({db!r})  # every process opens the fresh file at once, too
for n in range({count}):
    _put(db, sys.argv[1], n)
db.close()
"""


def test_several_processes_write_at_once(tmp_path: Path) -> None:
    """The CLI beside the daemon: processes (and threads in this one) writing one fresh db."""
    path, go, count = tmp_path / "root" / "artifacts.sqlite3", tmp_path / "go", 40
    script = _WRITER.format(tests=str(Path(__file__).parent), go=str(go), db=str(path),
                            count=count)
    procs = [subprocess.Popen([sys.executable, "-c", script, f"p{i}"], stderr=subprocess.PIPE)
             for i in range(5)]
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("ready-*"))) < len(procs):  # all imported: start at once
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.01)
        go.touch()
        db = ArtifactsDb(path)
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda t: [_put(db, f"local{t}", n) for n in range(count)], range(3)))
        db.close()
        errors = [p.communicate(timeout=120)[1].decode() for p in procs]
        assert [p.returncode for p in procs] == [0] * len(procs), errors
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    _check_consistent(path, [f"p{i}" for i in range(5)] + [f"local{t}" for t in range(3)], count)


# -- the store: every layer of an image looked up at once on a fresh root ---------------

LAYERS = 12


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """An image of 12 layers, each with a zTOC, whose SOCI index is in the registry only."""
    tmp = tmp_path_factory.mktemp("many")
    layers = [files_layer({f"l{i}/file{j}": f"layer {i} file {j}\n".encode() * 300
                           for j in range(5)}) for i in range(LAYERS)]
    with Registry() as reg, FaultProxy(reg.host) as proxy:
        write_image(tmp / "img", "v1", layers)
        push_layout(tmp / "img", reg.host, "many:v1", tag="v1")
        ref = f"{proxy.host}/many:v1"
        builder = tmp / "builder"
        soci(builder, "create", "--min-layer-size", "0", "--span-size", "65536", ref)
        soci(builder, "push", ref)
        manifest = json.loads(subprocess.run(
            ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
            capture_output=True, check=True).stdout)
        index = json.loads(soci(builder, "index", "list", "--json"))
        assert len(index) == 1
        yield {"tmp": tmp, "proxy": proxy, "ref": ref, "index": index[0]["digest"],
               "layers": [la["digest"] for la in manifest["layers"]]}


@pytest.mark.parametrize("run", range(5))
def test_all_layers_of_an_image_looked_up_at_once(pushed: dict, run: int) -> None:
    """What podman does on a pull: 12 lookups at once, one discovery from the registry."""
    root = pushed["tmp"] / f"fresh{run}"
    proxy: FaultProxy = pushed["proxy"]
    before = len(proxy.counters.seen)
    with StoreDaemon(root, pushed["tmp"] / f"mnt{run}") as daemon:
        start = threading.Barrier(LAYERS)

        def look(i: int) -> list[str]:
            diff = daemon.layer_dir(pushed["ref"], pushed["layers"][i]) / "diff"
            start.wait()
            names = sorted(os.listdir(diff))
            assert (diff / f"l{i}" / "file3").read_bytes() == f"layer {i} file 3\n".encode() * 300
            return names

        with ThreadPoolExecutor(LAYERS) as pool:
            listings = list(pool.map(look, range(LAYERS)))
        assert listings == [[f"l{i}"] for i in range(LAYERS)], daemon.logs()[-3000:]
        assert "Traceback" not in daemon.logs()
    # One discovery for the 12 lookups: the index manifest was fetched once.
    index_gets = [s for s in proxy.counters.seen[before:]
                  if s.startswith("GET") and f"/manifests/{pushed['index']}" in s]
    assert len(index_gets) == 1, index_gets
    db = ArtifactsDb(root / "artifacts.sqlite3")
    assert [r.digest for r in db.indexes()] == [pushed["index"]]
    assert len(db.ztocs_of_index(pushed["index"])) == LAYERS
    db.close()


def test_a_failed_discovery_answers_enoent_to_every_lookup(pushed: dict) -> None:
    """A registry error while discovering: "not here" (podman pulls), shared, not remembered."""
    root = pushed["tmp"] / "failing"
    proxy: FaultProxy = pushed["proxy"]
    proxy.fail(LAYERS, 404, match=f"/manifests/{pushed['index']}")
    before = len(proxy.counters.seen)
    try:
        with StoreDaemon(root, pushed["tmp"] / "mnt-failing") as daemon:
            start = threading.Barrier(LAYERS)

            def look(i: int) -> int:
                start.wait()
                try:
                    os.stat(daemon.layer_dir(pushed["ref"], pushed["layers"][i]) / "diff")
                except OSError as e:
                    return e.errno or 0
                return 0

            with ThreadPoolExecutor(LAYERS) as pool:
                assert list(pool.map(look, range(LAYERS))) == [errno.ENOENT] * LAYERS
            index_gets = [s for s in proxy.counters.seen[before:]
                          if s.startswith("GET") and f"/manifests/{pushed['index']}" in s]
            # Lookups that overlap share one failed discovery; a lookup that starts after it
            # failed asks again (failures are not remembered), so on a loaded machine there
            # may be a second request, never one per layer.
            assert 1 <= len(index_gets) < LAYERS // 2, index_gets
            for digest in pushed["layers"]:
                assert any("cannot resolve" in line and digest in line
                           for line in daemon.logs().splitlines()), digest
            proxy.clear()
            # the failure is not remembered: the next lookup discovers the index and serves
            diff = daemon.layer_dir(pushed["ref"], pushed["layers"][0]) / "diff"
            assert (diff / "l0" / "file0").read_bytes() == b"layer 0 file 0\n" * 300
    finally:
        proxy.clear()


def test_overlapping_discoveries_share_one_answer_or_error() -> None:
    """The single flight itself, deterministically: waiters get the leader's result/error."""
    flights = DiscoveryFlights()
    started, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def slow(outcome: object) -> Callable[[], object]:
        def run() -> object:
            calls.append(1)
            started.set()
            release.wait(10)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome
        return run

    for outcome in ("found", RuntimeError("registry down")):
        calls.clear()
        started.clear()
        release.clear()
        results: list[object] = []

        def call(outcome: object = outcome, results: list[object] = results) -> None:
            try:
                results.append(flights.run(("sha256:m", "r/x"), slow(outcome)))
            except RuntimeError as e:
                results.append(e)

        leader = threading.Thread(target=call)
        leader.start()
        assert started.wait(10)
        waiters = [threading.Thread(target=call) for _ in range(5)]
        for t in waiters:
            t.start()
        flight = flights._running[("sha256:m", "r/x")]
        deadline = time.monotonic() + 10
        while len(flight.done._cond._waiters) < 5:  # every waiter parked on the leader's flight
            assert time.monotonic() < deadline
            time.sleep(0.001)
        release.set()
        for t in [leader, *waiters]:
            t.join(10)
        assert len(results) == 6
        assert all(r is results[0] for r in results), results
        assert len(calls) == 1
