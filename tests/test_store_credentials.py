"""The store's local keychain: credentials handed over a root-only Unix socket."""

from __future__ import annotations

import base64
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

from images import big_file, files_layer, write_image
from registryd import Registry, push_layout
from storeenv import StoreDaemon

SECRET = "s3cret-pw-never-logged"
DATA = {"srv/payload.bin": big_file("creds", 1_000_000), "srv/hello": b"hello\n"}


def test_credentials_socket(tmp_path: Path) -> None:
    with Registry(htpasswd={"executor": SECRET}) as reg:
        write_image(tmp_path / "img", "v1", [files_layer(DATA)])
        push_layout(tmp_path / "img", reg.host, "private:v1", tag="v1",
                    creds=("executor", SECRET))
        ref = f"{reg.host}/private:v1"
        auth = tmp_path / "auth.json"
        token = base64.b64encode(f"executor:{SECRET}".encode()).decode()
        auth.write_text(json.dumps({"auths": {reg.host: {"auth": token}}}))
        root = tmp_path / "root"
        env = {**os.environ, "REGISTRY_AUTH_FILE": str(auth)}
        subprocess.run([sys.executable, "-m", "soci.cli", "--plain-http", "--root", str(root),
                        "create", "--min-layer-size", "0", ref], env=env, check=True,
                       capture_output=True)
        manifest = json.loads(subprocess.run(
            ["skopeo", "inspect", "--raw", "--tls-verify=false", "--creds",
             f"executor:{SECRET}", f"docker://{ref}"], capture_output=True, check=True).stdout)
        digest = manifest["layers"][0]["digest"]

        # The daemon itself has no way to log in: no auth files anywhere it looks.
        home = tmp_path / "home"
        home.mkdir()
        bare = {k: v for k, v in os.environ.items()
                if k not in ("REGISTRY_AUTH_FILE", "DOCKER_CONFIG")}
        bare.update(HOME=str(home), XDG_RUNTIME_DIR=str(home),
                    REGISTRY_AUTH_FILE=str(home / "none.json"))
        with StoreDaemon(root, tmp_path / "mnt", env=bare) as daemon:
            sock = root / "credentials.sock"
            assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
            diff = daemon.layer_dir(ref, digest) / "diff"
            try:
                os.listdir(diff)
                raise AssertionError("the store read a private image without credentials")
            except OSError:
                pass
            proc = subprocess.run(
                [sys.executable, "-m", "soci.cli", "--root", str(root), "store", "credentials",
                 ref, "-u", "executor", "--password-stdin"], input=SECRET + "\n",
                capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr
            assert (diff / "srv" / "hello").read_bytes() == b"hello\n"
            assert (diff / "srv" / "payload.bin").read_bytes() == DATA["srv/payload.bin"]

            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.connect(str(sock))
                conn.sendall(b"{not json")
                conn.shutdown(socket.SHUT_WR)
                assert "error" in json.loads(conn.recv(4096))
            assert "credentials received for" in daemon.logs()
            assert SECRET not in daemon.logs()
