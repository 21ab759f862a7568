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
import json
import logging
import os
import socket
import struct
import threading

from soci.registry import Credentials, CredentialStore, Reference

log = logging.getLogger("soci.credentials")
_MAX_REQUEST = 64 << 10


def _handle(conn: socket.socket, store: CredentialStore) -> dict[str, object]:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    if uid != 0:
        return {"error": "only root may hand credentials to soci-store"}
    data = b""
    while len(data) < _MAX_REQUEST:
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


def serve_credentials(path: str, store: CredentialStore) -> socket.socket:
    """Listen on ``path`` (replacing a stale socket) and serve requests on a thread."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        server.bind(path)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    server.listen(16)

    def loop() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                try:
                    reply = _handle(conn, store)
                except OSError as e:
                    reply = {"error": f"bad request: {e.strerror}"}
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps(reply).encode())

    threading.Thread(target=loop, name="soci-credentials", daemon=True).start()
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
