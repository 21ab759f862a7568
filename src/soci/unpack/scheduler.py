"""Download and unpack many layers at once, handing them out one by one.

containerd asks a snapshotter to Prepare the layers of an image one after another; if each
Prepare fetched and unpacked its own layer, the pull would be sequential. Instead the
caller submits every layer of the image as soon as it knows them; each gets a background
thread that downloads the blob under the download limits and unpacks it under the unpack
limits: straight from the network when unpack slots are free as the download starts, else
through a spool file beside its destination (checked against size and digest) so that
downloads go on while unpacks wait.
``wait(digest)`` blocks until that one layer is ready, so Prepare in order still finds the
later layers already done or under way.

The limits are upstream's ``[pull_modes.parallel_pull_unpack]`` keys (``ParallelPullConfig``):
a global and a per-image cap for downloads and for unpacks, negative meaning unbounded.
Blobs that are local regular files (a content store) are unpacked in place, without a
spool copy or a download slot. With ``concurrent_download_chunk_size`` set and a layer that
offers ``fetch_range``, its blob is fetched as concurrent ranged requests (each one under
the download limits) into the spool file, then hashed whole before it is unpacked.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, BinaryIO

from soci.errors import NotFoundError, SociError
from soci.unpack.errors import LayerDigestError, UnpackCancelledError, UnpackError
from soci.unpack.extract import (
    HashingReader,
    UnpackResult,
    check_digest,
    compression_of,
    unpack_stream,
)

_SPOOL_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class LayerSpec:
    """One layer to fetch and unpack. ``open`` returns the compressed blob as a stream
    with ``read(n)``/``close()`` (e.g. ``lambda: client.open_blob(ref, digest, size=size)``);
    ``image`` groups layers for the per-image limits. ``fetch_range(start, end)`` (bytes
    ``[start, end)``, e.g. ``client.get_blob_range``), with a known ``size``, lets the blob
    be downloaded in concurrent chunks of ``concurrent_download_chunk_size``."""

    digest: str
    size: int | None
    media_type: str
    diff_id: str
    dest: str
    open: Callable[[], BinaryIO]
    image: str = ""
    fetch_range: Callable[[int, int], bytes] | None = None


_UNITS = {"": 1, "b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30}


def parse_size(value: str | int) -> int:
    """``"16mb"``, ``"1.5GB"``, ``"4096"`` or an int -> bytes; ``""``/0/negative: unbounded
    (-1), as upstream reads ``concurrent_download_chunk_size``."""
    if isinstance(value, bool):
        raise SociError(f"invalid size {value!r}")
    if isinstance(value, int):
        return value if value > 0 else -1
    text = value.strip().lower()
    if not text:
        return -1
    number = text.rstrip("kmgb").strip()
    unit = text[len(number):].strip()
    try:
        amount = float(number)
    except ValueError:
        raise SociError(f"invalid size {value!r}") from None
    if unit not in _UNITS or amount < 0:
        raise SociError(f"invalid size {value!r}")
    size = int(amount * _UNITS[unit])
    return size if size > 0 else -1


@dataclass(slots=True)
class ParallelPullConfig:
    """Upstream's ``[pull_modes.parallel_pull_unpack]`` table. Negative limits are
    unbounded. Defaults are upstream's except ``max_concurrent_unpacks_per_image`` (upstream
    1, which would unpack an image's layers one at a time: here 2, the point of the mode
    on small machines too)."""

    enable: bool = False
    max_concurrent_downloads: int = -1
    max_concurrent_downloads_per_image: int = 3
    concurrent_download_chunk_size: int = -1  # bytes; -1: one request per blob
    max_concurrent_unpacks: int = -1
    max_concurrent_unpacks_per_image: int = 2
    discard_unpacked_layers: bool = False

    @classmethod
    def from_toml(cls, table: dict[str, Any]) -> ParallelPullConfig:
        """From the parsed ``[pull_modes.parallel_pull_unpack]`` table (unknown keys, such
        as upstream's ``decompress_streams``, are ignored)."""
        cfg = cls()
        for key in ("enable", "discard_unpacked_layers"):
            if key in table:
                if not isinstance(table[key], bool):
                    raise SociError(f"parallel_pull_unpack.{key} must be a boolean")
                setattr(cfg, key, table[key])
        for key in ("max_concurrent_downloads", "max_concurrent_downloads_per_image",
                    "max_concurrent_unpacks", "max_concurrent_unpacks_per_image"):
            if key in table:
                value = table[key]
                if isinstance(value, bool) or not isinstance(value, int) or value == 0:
                    raise SociError(
                        f"parallel_pull_unpack.{key} must be a non-zero integer")
                setattr(cfg, key, value)
        if "concurrent_download_chunk_size" in table:
            cfg.concurrent_download_chunk_size = parse_size(
                table["concurrent_download_chunk_size"])
        return cfg


class _Slots:
    """A counting limit whose waiters give up when their job is cancelled."""

    def __init__(self, limit: int) -> None:
        self._limit = limit if limit > 0 else None
        self._used = 0
        self._cond = threading.Condition()

    def acquire(self, stopped: Callable[[], bool]) -> None:
        with self._cond:
            while self._limit is not None and self._used >= self._limit:
                if stopped():
                    raise UnpackCancelledError("unpack cancelled while queued")
                self._cond.wait(0.2)
            self._used += 1

    def try_acquire(self) -> bool:
        with self._cond:
            if self._limit is not None and self._used >= self._limit:
                return False
            self._used += 1
            return True

    def release(self) -> None:
        with self._cond:
            self._used -= 1
            self._cond.notify()


@dataclass(slots=True)
class _Job:
    spec: LayerSpec
    future: Future[UnpackResult]
    cancel: threading.Event
    thread: threading.Thread | None = None


class ParallelUnpacker:
    """Fetch and unpack layers in background threads; ``wait`` for each in any order.

    A failure is delivered only to the waiter of that layer. ``close()`` cancels what is
    unfinished and removes its spool files and staging directories (finished layers stay).
    """

    def __init__(
        self,
        max_concurrent_downloads: int = -1,
        max_concurrent_unpacks: int = -1,
        *,
        max_concurrent_downloads_per_image: int = 3,
        max_concurrent_unpacks_per_image: int = 2,
        concurrent_download_chunk_size: int = -1,
        inflater: str = "isal-threaded",
    ) -> None:
        for value in (max_concurrent_downloads, max_concurrent_unpacks,
                      max_concurrent_downloads_per_image, max_concurrent_unpacks_per_image):
            if value == 0:
                raise ValueError("a concurrency limit cannot be 0 (negative: unbounded)")
        self._downloads = _Slots(max_concurrent_downloads)
        self._unpacks = _Slots(max_concurrent_unpacks)
        self._per_image_limits = (max_concurrent_downloads_per_image,
                                  max_concurrent_unpacks_per_image)
        self._per_image: dict[str, tuple[_Slots, _Slots]] = {}
        self._inflater = inflater
        self._chunk_size = concurrent_download_chunk_size
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_config(cls, cfg: ParallelPullConfig) -> ParallelUnpacker:
        return cls(
            cfg.max_concurrent_downloads, cfg.max_concurrent_unpacks,
            max_concurrent_downloads_per_image=cfg.max_concurrent_downloads_per_image,
            max_concurrent_unpacks_per_image=cfg.max_concurrent_unpacks_per_image,
            concurrent_download_chunk_size=cfg.concurrent_download_chunk_size,
        )

    def __enter__(self) -> ParallelUnpacker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, spec: LayerSpec) -> None:
        """Start fetching and unpacking ``spec`` now. Submitting a digest again with the
        same destination is a no-op (the first job is kept)."""
        check_digest(spec.digest, "layer digest")
        with self._lock:
            if self._closed:
                raise UnpackError("the parallel unpacker is closed")
            job = self._jobs.get(spec.digest)
            if job is not None:
                if os.path.abspath(job.spec.dest) != os.path.abspath(spec.dest):
                    raise UnpackError(
                        f"layer {spec.digest} is already being unpacked to {job.spec.dest}")
                return
            job = _Job(spec, Future(), threading.Event())
            job.future.set_running_or_notify_cancel()
            self._jobs[spec.digest] = job
            if spec.image not in self._per_image:
                dl, up = self._per_image_limits
                self._per_image[spec.image] = (_Slots(dl), _Slots(up))
            job.thread = threading.Thread(
                target=self._run, args=(job,), name=f"unpack-{spec.digest[7:19]}", daemon=True)
            job.thread.start()

    def submit_all(self, specs: Iterable[LayerSpec]) -> None:
        for spec in specs:
            self.submit(spec)

    def wait(self, digest: str, timeout: float | None = None) -> UnpackResult:
        """The result of layer ``digest``, or the ``SociError`` its job ended with."""
        with self._lock:
            job = self._jobs.get(digest)
        if job is None:
            raise NotFoundError(f"layer {digest} was not submitted for unpacking")
        return job.future.result(timeout)

    def done(self, digest: str) -> bool:
        with self._lock:
            job = self._jobs.get(digest)
        return job is not None and job.future.done()

    def forget(self, digest: str) -> None:
        """Drop a finished layer's job (its result was claimed), so the layer can be
        submitted again later; an unfinished job is cancelled first."""
        self.cancel(digest)
        with self._lock:
            self._jobs.pop(digest, None)

    def cancel(self, digest: str) -> None:
        """Stop one layer's job (its waiter gets ``UnpackCancelledError``)."""
        with self._lock:
            job = self._jobs.get(digest)
        if job is not None:
            job.cancel.set()
            if job.thread is not None:
                job.thread.join()

    def close(self) -> None:
        """Cancel every unfinished job and wait for their threads to clean up."""
        with self._lock:
            self._closed = True
            jobs = list(self._jobs.values())
        for job in jobs:
            job.cancel.set()
        for job in jobs:
            if job.thread is not None:
                job.thread.join()

    # -- the job -----------------------------------------------------------------------

    def _run(self, job: _Job) -> None:
        try:
            result = self._fetch_and_unpack(job)
        except BaseException as e:  # delivered to the waiter
            if not isinstance(e, SociError):
                e = UnpackError(f"unpacking layer {job.spec.digest} failed: {e}")
            job.future.set_exception(e)
        else:
            job.future.set_result(result)

    def _fetch_and_unpack(self, job: _Job) -> UnpackResult:
        spec, cancel = job.spec, job.cancel
        compression_of(spec.media_type)  # unsupported types fail before any download
        check_digest(spec.diff_id, "diff ID")
        image_dl, image_up = self._per_image[spec.image]
        spool: str | None = None
        stream: BinaryIO | None = None
        unpack_slots: list[_Slots] = []
        chunked = (self._chunk_size > 0 and spec.fetch_range is not None
                   and spec.size is not None and spec.size > self._chunk_size)
        try:
            if chunked:
                spool = self._spool_ranges(spec, cancel, image_dl)
                stream = open(spool, "rb")  # noqa: SIM115 - closed in finally
            else:
                with _held(image_dl, cancel), _held(self._downloads, cancel):
                    if cancel.is_set():
                        raise UnpackCancelledError(f"unpack of {spec.digest} cancelled")
                    stream = spec.open()
                    if not _is_local_file(stream):
                        # With unpack slots free right now, unpack while downloading; else
                        # download into a spool file so the network is not held up by unpacks.
                        if image_up.try_acquire():
                            unpack_slots.append(image_up)
                            if self._unpacks.try_acquire():
                                unpack_slots.append(self._unpacks)
                        if len(unpack_slots) == 2:
                            return self._unpack(spec, stream, cancel, verify=True)
                        _release(unpack_slots)
                        spool = self._spool(spec, stream, cancel)
                        stream.close()
                        stream = open(spool, "rb")  # noqa: SIM115 - closed in finally
            with _held(image_up, cancel), _held(self._unpacks, cancel):
                return self._unpack(spec, stream, cancel, verify=spool is None)
        finally:
            _release(unpack_slots)
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.close()
            if spool is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(spool)

    def _unpack(self, spec: LayerSpec, stream: BinaryIO, cancel: threading.Event,
                verify: bool) -> UnpackResult:
        return unpack_stream(
            stream, spec.dest, media_type=spec.media_type, digest=spec.digest,
            diff_id=spec.diff_id, size=spec.size, verify_compressed=verify, cancel=cancel,
            inflater=self._inflater)

    def _spool_ranges(self, spec: LayerSpec, cancel: threading.Event,
                      image_dl: _Slots) -> str:
        """Download the blob in concurrent ranged requests, each under the download
        limits (upstream's chunked download), into a spool file; then check its digest."""
        assert spec.fetch_range is not None and spec.size is not None
        fetch_range, size, chunk = spec.fetch_range, spec.size, self._chunk_size
        ranges = [(start, min(start + chunk, size)) for start in range(0, size, chunk)]
        failed = threading.Event()

        def stopped() -> bool:
            return cancel.is_set() or failed.is_set()

        parent, base = os.path.split(os.path.abspath(spec.dest))
        fd, path = tempfile.mkstemp(prefix=f"{base}.tmp-", suffix=".blob", dir=parent)

        def fetch(start: int, end: int) -> None:
            with _held(image_dl, stopped), _held(self._downloads, stopped):
                if stopped():
                    raise UnpackCancelledError(f"download of {spec.digest} cancelled")
                data = fetch_range(start, end)
            if len(data) != end - start:
                raise LayerDigestError(f"layer blob {spec.digest}: range [{start}, {end}) "
                                       f"returned {len(data)} bytes")
            view = memoryview(data)
            while view:
                written = os.pwrite(fd, view, start)
                view, start = view[written:], start + written

        try:
            os.ftruncate(fd, size)
            with ThreadPoolExecutor(min(len(ranges), 16), "unpack-range") as pool:
                futures = [pool.submit(fetch, start, end) for start, end in ranges]
                error: BaseException | None = None
                for future in as_completed(futures):
                    if future.exception() is not None and error is None:
                        error = future.exception()
                        failed.set()
            if cancel.is_set():
                raise UnpackCancelledError(f"download of {spec.digest} cancelled")
            if error is not None:
                raise error
            with open(fd, "rb", closefd=False) as blob:
                reader = HashingReader(blob, spec.digest, size)
                reader.drain()
                reader.verify()
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise
        finally:
            os.close(fd)
        return path

    @staticmethod
    def _spool(spec: LayerSpec, stream: BinaryIO, cancel: threading.Event) -> str:
        """Download the blob next to its destination, checking size and digest."""
        parent, base = os.path.split(os.path.abspath(spec.dest))
        fd, path = tempfile.mkstemp(prefix=f"{base}.tmp-", suffix=".blob", dir=parent)
        try:
            def check() -> None:
                if cancel.is_set():
                    raise UnpackCancelledError(f"unpack of {spec.digest} cancelled")

            reader = HashingReader(stream, spec.digest, spec.size, check)
            with open(fd, "wb", closefd=True) as out:
                while data := reader.read(_SPOOL_CHUNK):
                    out.write(data)
            reader.verify()
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise
        return path


@contextlib.contextmanager
def _held(slots: _Slots, stop: threading.Event | Callable[[], bool]) -> Any:
    slots.acquire(stop.is_set if isinstance(stop, threading.Event) else stop)
    try:
        yield
    finally:
        slots.release()


def _release(held: list[_Slots]) -> None:
    while held:
        held.pop().release()


def _is_local_file(stream: Any) -> bool:
    """A blob already on local disk needs no spool copy (and no download slot)."""
    try:
        return stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return False
