"""soci-store on a bad day: a registry that fails, throttles, drops, stalls and lies.

Concurrent readers keep reading random ranges while faults are injected between the store
and a real docker-registry; the caches are kept tiny (and the page cache is dropped per
read) so reads keep going to the registry. Counted: reads attempted, reads correct,
reads failed with EIO, wrong bytes served (must be 0), daemon crashes (must be 0).
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from images import big_file, files_layer, write_image
from registryd import FaultProxy, Registry, push_layout
from storeenv import StoreDaemon

FILES = {f"d/f{i}.bin": big_file(f"fault{i}", 1_500_000) for i in range(6)}
TINY_CACHES = """
[blob]
fetching_timeout_sec = 1.0
max_retries = 6
[cache]
memory_mb = 2
disk_mb = 2
"""


def test_faults_under_concurrent_readers(tmp_path: Path) -> None:
    with Registry() as reg, FaultProxy(reg.host) as proxy:
        write_image(tmp_path / "img", "v1", [files_layer(FILES)])
        push_layout(tmp_path / "img", reg.host, "faulty:v1", tag="v1")
        ref = f"{proxy.host}/faulty:v1"
        root = tmp_path / "root"
        subprocess.run([sys.executable, "-m", "soci.cli", "--plain-http", "--root", str(root),
                        "create", "--min-layer-size", "0", "--span-size", "262144", ref],
                       check=True, capture_output=True)
        digest = subprocess.run(
            [sys.executable, "-m", "soci.cli", "--root", str(root), "ztoc", "ls", "--json"],
            capture_output=True, check=True, text=True).stdout
        layer = __import__("json").loads(digest)[0]["layer_digest"]

        with StoreDaemon(root, tmp_path / "mnt", extra_config=TINY_CACHES) as daemon:
            diff = daemon.layer_dir(ref, layer) / "diff"
            os.listdir(diff)  # resolve before the storm
            stop = threading.Event()
            rng = random.Random(1)

            def storm() -> None:
                kinds = ["fail503", "fail429", "drop", "corrupt", "fail500"] * 3 + ["stall"]
                while not stop.wait(0.25):
                    kind = rng.choice(kinds)
                    if kind == "fail503":
                        proxy.fail(1, 503, match="/blobs/")
                    elif kind == "fail500":
                        proxy.fail(1, 500, match="/blobs/")
                    elif kind == "fail429":
                        proxy.fail(1, 429, retry_after="0", match="/blobs/")
                    elif kind == "drop":
                        proxy.drop(1, match="/blobs/")
                    elif kind == "corrupt":
                        proxy.corrupt(1, match="/blobs/")
                    else:
                        proxy.stall(1, 2.0, match="/blobs/")

            counts = {"attempted": 0, "correct": 0, "short": 0, "eio": 0, "wrong": 0}
            lock = threading.Lock()

            def reader(seed: int) -> None:
                r = random.Random(seed)
                deadline = time.monotonic() + 8
                while time.monotonic() < deadline:
                    name = r.choice(list(FILES))
                    off, size = r.randrange(0, 1_400_000), r.choice([4096, 65536, 200_000])
                    fd = os.open(diff / name, os.O_RDONLY)
                    try:
                        data = os.pread(fd, size, off)
                        want = FILES[name][off : off + size]
                        if data == want:
                            outcome = "correct"
                        elif data == want[: len(data)]:
                            # The kernel splits a big read into several FUSE requests; when a
                            # later one fails it returns the bytes it has (POSIX short read).
                            outcome = "short"
                        else:
                            outcome = "wrong"
                    except OSError as e:
                        assert e.errno == errno.EIO, e
                        outcome = "eio"
                    finally:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                        os.close(fd)
                    with lock:
                        counts["attempted"] += 1
                        counts[outcome] += 1

            storm_thread = threading.Thread(target=storm, daemon=True)
            storm_thread.start()
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(reader, range(8)))
            stop.set()
            storm_thread.join()
            proxy.clear()
            print(f"\nfault storm: {counts}, injected {proxy.counters.injected}")
            assert counts["wrong"] == 0
            assert counts["attempted"] > 50
            assert counts["correct"] > counts["attempted"] * 0.5
            assert sum(proxy.counters.injected.values()) > 15
            assert daemon.proc is not None and daemon.proc.poll() is None  # no crash
            # and after the storm everything reads back whole
            for name, data in FILES.items():
                assert (diff / name).read_bytes() == data
