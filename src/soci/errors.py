"""The exceptions soci raises on bad input.

Every error a user can cause derives from ``SociError`` and carries a message
that names what was wrong in one line; the CLI prints exactly that line.
"""

from __future__ import annotations


class SociError(Exception):
    """Base class for errors caused by input, configuration or the environment."""

    def within(self, context: str) -> SociError:
        """This error, its message prefixed with what it happened to (``layer sha256:... of
        IMAGE``), class and attributes kept; for ``raise e.within(...)`` where that is known."""
        self.args = (f"{context}: {self}", *self.args[1:])
        return self


class LayerFormatError(SociError):
    """A layer blob is not a readable gzip or tar stream (corrupt, truncated, unsupported)."""


class ZtocFormatError(SociError):
    """A zTOC (or its checkpoint blob) is malformed."""


class NotFoundError(SociError):
    """A requested file, digest or object does not exist."""


class DigestMismatchError(SociError):
    """Content did not match the digest (or size) it was requested by; it was not used."""


class InvalidReferenceError(SociError, ValueError):
    """An image reference (``registry/repository:tag@digest``) does not parse.

    Also a ``ValueError`` so callers validating user input can catch it the usual way.
    """


class RegistryError(SociError):
    """A registry answered with an error, or could not be reached after retries.

    ``status`` is the HTTP status (``None`` for transport failures), ``code`` the first
    distribution error code from the body (``MANIFEST_UNKNOWN``, ...), and ``transient``
    tells whether trying the whole operation again later could succeed (5xx, 429,
    connection errors); uploads use it to decide whether to restart.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        transient: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.transient = transient


class AuthError(RegistryError):
    """Credentials are missing, rejected, or do not grant the access a request needs."""


_KINDS = {int: "an integer", float: "a number", bool: "a boolean", str: "a string",
          list: "a list", dict: "a table"}


def kind_name(kind: type) -> str:
    """How a config error names a value's expected type: "an integer", not "a int"."""
    return _KINDS.get(kind, f"a {kind.__name__}")
