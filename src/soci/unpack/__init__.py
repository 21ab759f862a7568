"""Non-lazy layers: fetch and unpack them ourselves, several at once, inflating with ISA-L.

The containerd snapshotter uses this for layers that have no SOCI index (upstream's
"parallel pull and unpack" mode): ``ParallelUnpacker`` schedules downloads and unpacks,
``unpack_stream``/``unpack_file`` unpack one verified layer into an overlay directory.
"""

from soci.unpack.errors import (
    LayerDigestError,
    UnpackCancelledError,
    UnpackError,
    UnsafeLayerError,
    UnsupportedLayerError,
)
from soci.unpack.extract import UnpackResult, compression_of, unpack_file, unpack_stream
from soci.unpack.scheduler import LayerSpec, ParallelPullConfig, ParallelUnpacker, parse_size
from soci.unpack.tarstream import CorruptLayerError

__all__ = [
    "CorruptLayerError",
    "LayerDigestError",
    "LayerSpec",
    "ParallelPullConfig",
    "ParallelUnpacker",
    "UnpackCancelledError",
    "UnpackError",
    "UnpackResult",
    "UnsafeLayerError",
    "UnsupportedLayerError",
    "compression_of",
    "parse_size",
    "unpack_file",
    "unpack_stream",
]
