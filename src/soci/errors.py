"""The exceptions soci raises on bad input.

Every error a user can cause derives from ``SociError`` and carries a message
that names what was wrong in one line; the CLI prints exactly that line.
"""


class SociError(Exception):
    """Base class for errors caused by input, configuration or the environment."""


class LayerFormatError(SociError):
    """A layer blob is not a readable gzip or tar stream (corrupt, truncated, unsupported)."""


class ZtocFormatError(SociError):
    """A zTOC (or its checkpoint blob) is malformed."""


class NotFoundError(SociError):
    """A requested file, digest or object does not exist."""
