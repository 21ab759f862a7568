"""A small synchronous client of containerd's gRPC API: what pulling an image needs.

containerd scopes every call by two pieces of gRPC metadata: ``containerd-namespace`` (which
namespace's images, content and snapshots are meant) and, optionally, ``containerd-lease`` (a
lease that keeps what the call creates from the garbage collector until the caller has linked
it into an image). :class:`Containerd` sends both on every call; :meth:`Containerd.lease` creates
a lease with an expiry label and deletes it at the end, as containerd's own client does.

Every failure becomes one line: :class:`ContainerdUnavailable` when the socket cannot be
reached, :class:`ContainerdError` (with the gRPC status ``code``) for an answer containerd
refused. Callers branch on ``code`` (``ALREADY_EXISTS`` from Prepare is how a remote snapshotter
says "mounted lazily").
"""

from __future__ import annotations

import contextlib
import datetime
import os
import queue
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf import field_mask_pb2

from soci.containerd.api import (
    content_pb2,
    content_pb2_grpc,
    diff_pb2,
    diff_pb2_grpc,
    images_pb2,
    images_pb2_grpc,
    leases_pb2,
    leases_pb2_grpc,
    snapshots_pb2,
    snapshots_pb2_grpc,
    types_pb2,
)
from soci.errors import SociError
from soci.oci.descriptor import Descriptor

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
DEFAULT_NAMESPACE = "default"

#: containerd's label naming a lease's expiry (RFC 3339); its GC drops the lease after it.
LABEL_GC_EXPIRE = "containerd.io/gc.expire"

#: Bytes per Content.Write message: well under gRPC's 4 MiB default message limit.
WRITE_CHUNK = 1 << 20

#: How long short metadata calls may take before the pull gives up on containerd.
CALL_TIMEOUT = 60.0

#: containerd's limit on one label (key and value together), pkg/labels.Validate.
MAX_LABEL_SIZE = 4096

_MAX_MESSAGE = 16 << 20
T = TypeVar("T")


class ContainerdError(SociError):
    """containerd answered a call with an error status (``code``: a ``grpc.StatusCode``)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class ContainerdUnavailable(ContainerdError):
    """containerd's socket cannot be reached (not running, wrong ``--address``)."""


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unknown_snapshotter(e: grpc.RpcError) -> bool:
    """containerd's answer for a snapshotter it has not loaded: NOT_FOUND in 2.x,
    INVALID_ARGUMENT in 1.6, the same words in both."""
    return "snapshotter not loaded" in (e.details() or "")


@dataclass(slots=True)
class ContentInfo:
    digest: str
    size: int
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class SnapshotInfo:
    name: str
    parent: str
    kind: str  # "view", "active", "committed"
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...] = ()


@dataclass(slots=True)
class ImageRecord:
    name: str
    target: Descriptor
    labels: dict[str, str] = field(default_factory=dict)


def _descriptor_pb(desc: Descriptor) -> types_pb2.Descriptor:
    return types_pb2.Descriptor(media_type=desc.media_type, digest=desc.digest, size=desc.size,
                                annotations=dict(desc.annotations or {}))


def _descriptor_of(pb: types_pb2.Descriptor) -> Descriptor:
    return Descriptor(pb.media_type, pb.digest, pb.size, annotations=dict(pb.annotations) or None)


class Containerd:
    """One connection to containerd, scoped to a namespace (and a lease, inside :meth:`lease`).

    Not thread-safe for the lease (one pull at a time); the gRPC channel itself is.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, namespace: str = DEFAULT_NAMESPACE,
                 *, connect_timeout: float = 10.0) -> None:
        if not namespace:
            raise SociError("containerd namespace must not be empty")
        self.address = address
        self.namespace = namespace
        self.lease_id: str | None = None
        self._check_socket()
        self._channel = grpc.insecure_channel(
            f"unix:{os.path.abspath(address)}",
            options=[("grpc.max_receive_message_length", _MAX_MESSAGE),
                     ("grpc.max_send_message_length", _MAX_MESSAGE)],
        )
        try:
            grpc.channel_ready_future(self._channel).result(timeout=connect_timeout)
        except grpc.FutureTimeoutError:
            self._channel.close()
            raise ContainerdUnavailable(
                f"containerd at {address} did not answer within {connect_timeout:g}s"
            ) from None
        self._content = content_pb2_grpc.ContentStub(self._channel)
        self._snapshots = snapshots_pb2_grpc.SnapshotsStub(self._channel)
        self._diff = diff_pb2_grpc.DiffStub(self._channel)
        self._images = images_pb2_grpc.ImagesStub(self._channel)
        self._leases = leases_pb2_grpc.LeasesStub(self._channel)

    def _check_socket(self) -> None:
        """Say precisely why containerd cannot be reached, before gRPC retries in silence."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            try:
                s.connect(self.address)
            except OSError as e:
                reason = e.strerror or type(e).__name__
                raise ContainerdUnavailable(
                    f"cannot reach containerd at {self.address}: {reason} "
                    "(is containerd running? see --address)"
                ) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Containerd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------

    def _metadata(self) -> list[tuple[str, str]]:
        md = [("containerd-namespace", self.namespace)]
        if self.lease_id is not None:
            md.append(("containerd-lease", self.lease_id))
        return md

    def _call(self, what: str, method: Callable[..., T], request: Any,
              timeout: float | None = CALL_TIMEOUT) -> T:
        try:
            return method(request, metadata=self._metadata(), timeout=timeout)
        except grpc.RpcError as e:
            raise self._error(what, e) from None

    def _error(self, what: str, e: grpc.RpcError) -> ContainerdError:
        code = e.code() if hasattr(e, "code") else None
        details = _one_line((e.details() if hasattr(e, "details") else "") or str(code))
        if code == grpc.StatusCode.UNAVAILABLE and "connect" in details.lower():
            return ContainerdUnavailable(f"containerd at {self.address}: {details}", code)
        name = code.name if code is not None else "error"
        return ContainerdError(f"containerd: {what}: {details} ({name})", code)

    # -- leases --------------------------------------------------------------------------

    @contextlib.contextmanager
    def lease(self, expire: datetime.timedelta = datetime.timedelta(hours=24),
              *, sync_delete_on_error: bool = True) -> Iterator[str]:
        """A lease for everything created inside the block, deleted when it ends.

        On an error (or Ctrl-C) the deletion asks containerd to collect garbage at once
        (``sync``), so what the block half-made is gone when this returns; if even that
        fails the lease still expires by itself after ``expire``.
        """
        if self.lease_id is not None:
            raise RuntimeError("a lease is already active on this connection")
        lease_id = f"soci-pull-{time.time_ns()}-{secrets.token_hex(4)}"
        when = datetime.datetime.now(datetime.UTC) + expire
        labels = {LABEL_GC_EXPIRE: when.strftime("%Y-%m-%dT%H:%M:%SZ")}
        self._call("create lease", self._leases.Create,
                   leases_pb2.CreateRequest(id=lease_id, labels=labels))
        self.lease_id = lease_id
        ok = False
        try:
            yield lease_id
            ok = True
        finally:
            self.lease_id = None
            sync = sync_delete_on_error and not ok
            try:
                self._call("delete lease", self._leases.Delete,
                           leases_pb2.DeleteRequest(id=lease_id, sync=sync),
                           timeout=CALL_TIMEOUT * 5 if sync else CALL_TIMEOUT)
            except ContainerdError:
                if ok:
                    raise
                # The original error matters more; the lease expires by its label.

    # -- content -------------------------------------------------------------------------

    def content_info(self, digest: str) -> ContentInfo | None:
        """The blob's info, or ``None`` when this namespace does not have it."""
        try:
            info = self._content.Info(content_pb2.InfoRequest(digest=digest),
                                      metadata=self._metadata(), timeout=CALL_TIMEOUT).info
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise self._error(f"content info {digest}", e) from None
        return ContentInfo(info.digest, info.size, dict(info.labels))

    def update_content_labels(self, digest: str, labels: Mapping[str, str]) -> None:
        """Set these labels on a blob (others untouched): a field mask of ``labels.<key>``."""
        if not labels:
            return
        mask = field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels])
        info = content_pb2.Info(digest=digest, labels=dict(labels))
        self._call(f"label content {digest}", self._content.Update,
                   content_pb2.UpdateRequest(info=info, update_mask=mask))

    def write_content(self, ref: str, desc: Descriptor, chunks: Iterable[bytes],
                      labels: Mapping[str, str] | None = None) -> bool:
        """Stream a blob into the content store and commit it under ``desc``'s digest.

        The stream opens with STAT, as containerd's client does: when another namespace
        already has the blob, containerd reports it fully written and only the COMMIT is sent
        (``chunks`` is never started, so nothing is downloaded). containerd checks size and
        digest at COMMIT. An exception raised by ``chunks`` (a registry serving wrong bytes)
        ends the stream without a COMMIT, aborts the ingest and propagates. Returns False if
        this namespace already had the blob (its labels are then left alone).
        """
        failure: list[BaseException] = []
        stat: queue.SimpleQueue[int | None] = queue.SimpleQueue()

        def message(action: int, offset: int, **more: Any) -> content_pb2.WriteContentRequest:
            return content_pb2.WriteContentRequest(action=action, ref=ref, total=desc.size,
                                                   expected=desc.digest, offset=offset, **more)

        def requests() -> Iterator[content_pb2.WriteContentRequest]:
            # Runs on gRPC's sending thread; the response loop below feeds ``stat``.
            yield message(content_pb2.STAT, 0)
            have = stat.get()
            if have is None:
                return  # the call failed before answering
            # COMMIT must then name that offset: offset 0 would truncate the shared blob.
            offset = have if have == desc.size else 0
            if offset == 0:
                try:
                    for chunk in chunks:
                        for i in range(0, len(chunk), WRITE_CHUNK):
                            piece = chunk[i:i + WRITE_CHUNK]
                            # Offset 0 first: containerd drops what a dead ingest left.
                            yield message(content_pb2.WRITE, offset, data=piece)
                            offset += len(piece)
                except BaseException as e:  # re-raised by write_content below
                    failure.append(e)
                    return
            yield message(content_pb2.COMMIT, offset, labels=dict(labels or {}))

        committed = False
        call = self._content.Write(requests(), metadata=self._metadata())
        try:
            # Responses are read as they come (one per request): left unread, they would
            # fill the flow-control window and stall a large blob's upload.
            for response in call:
                if response.action == content_pb2.STAT:
                    stat.put(response.offset if response.total == desc.size else 0)
                elif response.action == content_pb2.COMMIT:
                    if response.digest != desc.digest:
                        raise ContainerdError(f"containerd: wrote {desc.digest} but it "
                                              f"committed {response.digest}")
                    committed = True
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.ALREADY_EXISTS and not failure:
                return False
            if not failure:
                self.abort_content(ref)
                raise self._error(f"write {desc.digest}", e) from None
        except BaseException:
            call.cancel()  # Ctrl-C: stop the stream (no COMMIT was sent) and drop the ingest
            self.abort_content(ref)
            raise
        finally:
            stat.put(None)  # never leave the sending thread waiting
        if failure:
            self.abort_content(ref)
            raise failure[0]
        if not committed:
            self.abort_content(ref)
            raise ContainerdError(f"containerd: write {desc.digest}: stream ended before commit")
        return True

    def abort_content(self, ref: str) -> None:
        """Drop a half-written ingest (best effort: the lease covers it otherwise)."""
        with contextlib.suppress(grpc.RpcError):
            self._content.Abort(content_pb2.AbortRequest(ref=ref), metadata=self._metadata(),
                                timeout=CALL_TIMEOUT)

    # -- snapshots -----------------------------------------------------------------------

    def stat_snapshot(self, snapshotter: str, key: str) -> SnapshotInfo | None:
        try:
            info = self._snapshots.Stat(
                snapshots_pb2.StatSnapshotRequest(snapshotter=snapshotter, key=key),
                metadata=self._metadata(), timeout=CALL_TIMEOUT).info
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND and not _unknown_snapshotter(e):
                return None
            raise self._snapshotter_error(snapshotter, f"stat snapshot {key}", e) from None
        kind = snapshots_pb2.Kind.Name(info.kind).lower()
        return SnapshotInfo(info.name, info.parent, kind, dict(info.labels))

    def _snapshotter_error(self, snapshotter: str, what: str, e: grpc.RpcError) -> ContainerdError:
        if _unknown_snapshotter(e):
            return ContainerdError(
                f"containerd has no snapshotter {snapshotter!r} (for soci: is "
                "soci-snapshotter-grpc running and named in containerd's proxy_plugins?)",
                e.code())
        return self._error(f"{snapshotter}: {what}", e)

    def prepare_snapshot(self, snapshotter: str, key: str, parent: str,
                         labels: Mapping[str, str]) -> list[Mount]:
        """An active snapshot's mounts; ``ContainerdError`` with ``code`` ALREADY_EXISTS
        when the snapshotter already has the target (a remote snapshotter's lazy layer)."""
        req = snapshots_pb2.PrepareSnapshotRequest(snapshotter=snapshotter, key=key,
                                                   parent=parent, labels=dict(labels))
        try:
            resp = self._snapshots.Prepare(req, metadata=self._metadata(), timeout=CALL_TIMEOUT)
        except grpc.RpcError as e:
            raise self._snapshotter_error(snapshotter, f"prepare {key}", e) from None
        return [Mount(m.type, m.source, tuple(m.options)) for m in resp.mounts]

    def commit_snapshot(self, snapshotter: str, name: str, key: str,
                        labels: Mapping[str, str]) -> None:
        req = snapshots_pb2.CommitSnapshotRequest(snapshotter=snapshotter, name=name, key=key,
                                                  labels=dict(labels))
        try:
            self._snapshots.Commit(req, metadata=self._metadata(), timeout=CALL_TIMEOUT)
        except grpc.RpcError as e:
            raise self._snapshotter_error(snapshotter, f"commit {key}", e) from None

    def remove_snapshot(self, snapshotter: str, key: str) -> None:
        req = snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=key)
        try:
            self._snapshots.Remove(req, metadata=self._metadata(), timeout=CALL_TIMEOUT)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise self._snapshotter_error(snapshotter, f"remove {key}", e) from None

    def list_snapshots(self, snapshotter: str) -> list[SnapshotInfo]:
        req = snapshots_pb2.ListSnapshotsRequest(snapshotter=snapshotter)
        out: list[SnapshotInfo] = []
        try:
            for resp in self._snapshots.List(req, metadata=self._metadata(),
                                             timeout=CALL_TIMEOUT):
                out += [SnapshotInfo(i.name, i.parent, snapshots_pb2.Kind.Name(i.kind).lower(),
                                     dict(i.labels)) for i in resp.info]
        except grpc.RpcError as e:
            raise self._snapshotter_error(snapshotter, "list snapshots", e) from None
        return out

    # -- diff ----------------------------------------------------------------------------

    def apply(self, desc: Descriptor, mounts: Sequence[Mount]) -> Descriptor:
        """Unpack the layer blob ``desc`` (already in the content store) onto ``mounts``;
        returns the applied (uncompressed) descriptor. No deadline: big layers take time."""
        req = diff_pb2.ApplyRequest(
            diff=_descriptor_pb(desc),
            mounts=[types_pb2.Mount(type=m.type, source=m.source, options=list(m.options))
                    for m in mounts])
        resp = self._call(f"apply layer {desc.digest}", self._diff.Apply, req, timeout=None)
        return _descriptor_of(resp.applied)

    # -- images --------------------------------------------------------------------------

    def get_image(self, name: str) -> ImageRecord | None:
        try:
            image = self._images.Get(images_pb2.GetImageRequest(name=name),
                                     metadata=self._metadata(), timeout=CALL_TIMEOUT).image
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise self._error(f"get image {name}", e) from None
        return ImageRecord(image.name, _descriptor_of(image.target), dict(image.labels))

    def put_image(self, name: str, target: Descriptor,
                  labels: Mapping[str, str] | None = None) -> None:
        """Create the image record, or point an existing one at ``target`` (as containerd's
        client does: Create, and on ALREADY_EXISTS Update; NOT_FOUND then means it was
        deleted meanwhile, so Create again)."""
        image = images_pb2.Image(name=name, target=_descriptor_pb(target),
                                 labels=dict(labels or {}))
        for _ in range(3):
            try:
                self._images.Create(images_pb2.CreateImageRequest(image=image),
                                    metadata=self._metadata(), timeout=CALL_TIMEOUT)
                return
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise self._error(f"create image {name}", e) from None
            try:
                self._images.Update(images_pb2.UpdateImageRequest(image=image),
                                    metadata=self._metadata(), timeout=CALL_TIMEOUT)
                return
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    raise self._error(f"update image {name}", e) from None
        raise ContainerdError(f"containerd: image {name} keeps changing under this pull")
