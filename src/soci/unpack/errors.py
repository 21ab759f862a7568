"""Errors of the non-lazy unpack path, each a one-line ``SociError``.

``UnsupportedLayerError`` is the one a caller is expected to catch and answer by falling
back to containerd's own unpack (zstd, sparse files); every other error means the layer
itself is bad or could not be fetched.
"""

from __future__ import annotations

from soci.errors import DigestMismatchError, LayerFormatError, SociError


class UnpackError(SociError):
    """A layer could not be fetched or unpacked; nothing was left at its destination."""


class UnsupportedLayerError(UnpackError):
    """The layer uses a format this unpacker does not handle (zstd, GNU sparse files):
    fall back to the runtime's normal unpack."""


class UnsafeLayerError(UnpackError, LayerFormatError):
    """The layer tar tries to write outside its directory, through a symlink, or sets an
    attribute only the runtime may set (``trusted.overlay.*``); or it is malformed."""


class LayerDigestError(UnpackError, DigestMismatchError):
    """The compressed blob or the uncompressed tar did not match its digest (or size)."""


class UnpackCancelledError(UnpackError):
    """The unpack was cancelled (its unpacker closed) before it finished."""
