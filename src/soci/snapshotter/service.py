"""containerd's snapshots gRPC service over ``Snapshots``: requests in, errors as status codes.

containerd turns the status codes back into its own errors (``errdefs.FromGRPC``), and
relies on them: ALREADY_EXISTS from Prepare means "the layer is here, skip it";
NOT_FOUND, FAILED_PRECONDITION and INVALID_ARGUMENT mean what they say. Every request's
namespace (containerd 2.x forwards it; 1.6 does not) is only logged: containerd already
puts it in the keys it sends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from soci.containerd.api import snapshots_pb2 as pb
from soci.containerd.api import snapshots_pb2_grpc as pb_grpc
from soci.containerd.api import types_pb2
from soci.errors import NotFoundError, SociError
from soci.serve.metrics import Metrics
from soci.snapshotter.metadata import Kind, Snapshot
from soci.snapshotter.snapshots import (
    InvalidSnapshotRequest,
    Mount,
    SnapshotExists,
    SnapshotPrecondition,
    Snapshots,
)

log = logging.getLogger("soci.snapshotter.grpc")

#: Snapshots per List reply (containerd's own server sends them in batches too).
LIST_BATCH = 100

_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (SnapshotExists, grpc.StatusCode.ALREADY_EXISTS),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (SnapshotPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidSnapshotRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (SociError, grpc.StatusCode.UNKNOWN),
)

T = TypeVar("T")


def _mounts(mounts: list[Mount]) -> list[types_pb2.Mount]:
    return [types_pb2.Mount(type=m.type, source=m.source, options=list(m.options))
            for m in mounts]


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def info(s: Snapshot) -> pb.Info:
    return pb.Info(name=s.key, parent=s.parent, kind=int(s.kind), labels=s.labels,
                   created_at=_timestamp(s.created_ns), updated_at=_timestamp(s.updated_ns))


class SnapshotsService(pb_grpc.SnapshotsServicer):
    def __init__(self, snapshots: Snapshots, metrics: Metrics | None = None) -> None:
        self.snapshots = snapshots
        self.metrics = metrics

    def _call(self, context: grpc.ServicerContext, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn``, turning our errors into the status codes containerd understands."""
        method = what.split(" ", 1)[0]
        code = grpc.StatusCode.INTERNAL
        try:
            result = fn()
            code = grpc.StatusCode.OK
            return result
        except Exception as e:
            code = next((c for kind, c in _CODES if isinstance(e, kind)),
                        grpc.StatusCode.INTERNAL)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("%s failed", what)
                context.abort(code, f"{what}: {e}")
            if code is not grpc.StatusCode.ALREADY_EXISTS:
                log.info("%s: %s", what, e)
            context.abort(code, str(e))
            raise  # abort raises; this keeps type checkers content
        finally:
            if self.metrics is not None:
                self.metrics.request(method, code.name)

    def Prepare(self, request: pb.PrepareSnapshotRequest,
                context: grpc.ServicerContext) -> pb.PrepareSnapshotResponse:
        mounts = self._call(context, f"prepare {request.key!r}", lambda: self.snapshots.prepare(
            request.key, request.parent, dict(request.labels), Kind.ACTIVE))
        return pb.PrepareSnapshotResponse(mounts=_mounts(mounts))

    def View(self, request: pb.ViewSnapshotRequest,
             context: grpc.ServicerContext) -> pb.ViewSnapshotResponse:
        mounts = self._call(context, f"view {request.key!r}", lambda: self.snapshots.prepare(
            request.key, request.parent, dict(request.labels), Kind.VIEW))
        return pb.ViewSnapshotResponse(mounts=_mounts(mounts))

    def Mounts(self, request: pb.MountsRequest,
               context: grpc.ServicerContext) -> pb.MountsResponse:
        mounts = self._call(context, f"mounts {request.key!r}",
                            lambda: self.snapshots.mounts(request.key))
        return pb.MountsResponse(mounts=_mounts(mounts))

    def Commit(self, request: pb.CommitSnapshotRequest,
               context: grpc.ServicerContext) -> empty_pb2.Empty:
        self._call(context, f"commit {request.key!r}", lambda: self.snapshots.commit(
            request.name, request.key, dict(request.labels)))
        return empty_pb2.Empty()

    def Remove(self, request: pb.RemoveSnapshotRequest,
               context: grpc.ServicerContext) -> empty_pb2.Empty:
        self._call(context, f"remove {request.key!r}",
                   lambda: self.snapshots.remove(request.key))
        return empty_pb2.Empty()

    def Stat(self, request: pb.StatSnapshotRequest,
             context: grpc.ServicerContext) -> pb.StatSnapshotResponse:
        s = self._call(context, f"stat {request.key!r}", lambda: self.snapshots.stat(request.key))
        return pb.StatSnapshotResponse(info=info(s))

    def Update(self, request: pb.UpdateSnapshotRequest,
               context: grpc.ServicerContext) -> pb.UpdateSnapshotResponse:
        s = self._call(context, f"update {request.info.name!r}", lambda: self.snapshots.update(
            request.info.name, dict(request.info.labels), list(request.update_mask.paths)))
        return pb.UpdateSnapshotResponse(info=info(s))

    def List(self, request: pb.ListSnapshotsRequest,
             context: grpc.ServicerContext) -> Iterator[pb.ListSnapshotsResponse]:
        found = self._call(context, "list", lambda: self.snapshots.list(list(request.filters)))
        for i in range(0, len(found), LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=[info(s) for s in found[i:i + LIST_BATCH]])

    def Usage(self, request: pb.UsageRequest,
              context: grpc.ServicerContext) -> pb.UsageResponse:
        size, inodes = self._call(context, f"usage {request.key!r}",
                                  lambda: self.snapshots.usage(request.key))
        return pb.UsageResponse(size=size, inodes=inodes)

    def Cleanup(self, request: pb.CleanupRequest,
                context: grpc.ServicerContext) -> empty_pb2.Empty:
        removed = self._call(context, "cleanup", self.snapshots.cleanup)
        if removed:
            log.info("cleanup: removed %d directories no snapshot owns", removed)
        return empty_pb2.Empty()
