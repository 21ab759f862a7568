"""The fork's local keychain: an executor hands soci-store registry credentials for an image.

A Unix stream socket, created with mode 0600 and accepting only root peers
(checked with SO_PEERCRED as well), takes one JSON request per connection:

    {"ref": "registry.example.com/team/app:1.0", "username": "u", "password": "p"}

(or ``"identitytoken"`` instead of the password) and answers ``{"ok": true}`` or
``{"error": "..."}``. The credentials are used for that repository before any
auth file. Secrets are never logged.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import struct
import threading
import time

from soci.errors import SociError
from soci.registry import Credentials, CredentialStore, Reference

log = logging.getLogger("soci.credentials")
_MAX_REQUEST = 64 << 10
#: Seconds a peer has to send its whole request (and to take the answer).
_REQUEST_TIMEOUT = 10.0


def _handle(conn: socket.socket, store: CredentialStore) -> dict[str, object]:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    if uid != 0:
        return {"error": "only root may hand credentials to soci-store"}
    # One deadline for the whole request: a peer trickling a byte at a time must not hold
    # the (single) serving thread for longer than a slow honest client would.
    deadline = time.monotonic() + _REQUEST_TIMEOUT
    data = b""
    while len(data) < _MAX_REQUEST:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(errno.ETIMEDOUT, "request not complete in time")
        conn.settimeout(left)
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
        if data.rstrip().endswith(b"}"):
            break
    try:
        doc = json.loads(data)
        ref = Reference.parse(str(doc["ref"]))
        username = str(doc.get("username", ""))
        password = str(doc.get("password", ""))
        token = str(doc.get("identitytoken", ""))
    except (ValueError, KeyError, TypeError, AttributeError):
        return {"error": "want a JSON object with 'ref' and 'username'/'password' "
                         "or 'identitytoken'"}
    if not (username and password) and not token:
        return {"error": "no credentials in the request"}
    store.put(f"{ref.registry}/{ref.repository}", Credentials(username, password, token))
    log.info("credentials received for %s/%s", ref.registry, ref.repository)
    return {"ok": True}


def _is_live(path: str) -> bool:
    """Whether something accepts connections on the Unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(path)
        except OSError:
            return False  # ECONNREFUSED: a socket file nobody listens on (a crash left it)
    return True


class CredentialsServer:
    """The listening socket and its serving thread; :meth:`close` stops both."""

    def __init__(self, path: str, sock: socket.socket, store: CredentialStore) -> None:
        self.path, self.sock, self.store = path, sock, store
        self._inode = os.stat(path).st_ino
        self.thread = threading.Thread(target=self._loop, name="soci-credentials", daemon=True)

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    reply = _handle(conn, self.store)
                except OSError as e:
                    reply = {"error": f"bad request: {e.strerror or e}"}
                with contextlib.suppress(OSError):
                    conn.settimeout(_REQUEST_TIMEOUT)
                    conn.sendall(json.dumps(reply).encode())

    def close(self) -> None:
        """Stop accepting (shutdown wakes the blocked accept) and remove our socket file."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(timeout=1)  # a request in progress ends by its own deadline
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)


def serve_credentials(path: str, store: CredentialStore) -> CredentialsServer:
    """Listen on ``path`` and serve requests on a thread.

    A socket file nobody listens on (left by a crash) is replaced; a live one belongs to
    another soci-store and is refused rather than taken over.
    """
    if os.path.exists(path):
        if _is_live(path):
            raise SociError(f"another soci-store serves credentials at {path}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise SociError(f"cannot listen on {path}: {e.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(16)
    server = CredentialsServer(path, sock, store)
    server.thread.start()
    log.info("credentials socket at %s", path)
    return server


def send_credentials(path: str, ref: str, username: str, password: str) -> None:
    """The client side: raises OSError or ValueError with the store's answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(path)
        conn.sendall(json.dumps({"ref": ref, "username": username,
                                 "password": password}).encode())
        conn.shutdown(socket.SHUT_WR)
        reply = json.loads(conn.recv(4096) or b"{}")
    if not reply.get("ok"):
        raise ValueError(str(reply.get("error", "no answer from soci-store")))
