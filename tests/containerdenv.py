"""A private, real containerd for tests: either generation, its own everything, cleaned up.

Two generations run here (see ``ci/setup.sh``): ``"1.6"`` is Debian 12's package
(``/usr/bin/containerd``, config ``version = 2``); ``"2"`` is Debian sid's 2.x unpacked,
not installed, into ``.build/containerd-2/usr/bin`` (config ``version = 3``). Usage::

    from containerdenv import Containerd, GENERATIONS

    with Containerd("2", soci_socket="/run/x/soci.sock", snapshotter="soci",
                    registry_hosts=[registry.host]) as ctrd:
        ctrd.ctr("images", "pull", "--plain-http", f"{registry.host}/img:v1")
        out = ctrd.run(f"{registry.host}/img:v1", "cat", "/etc/hello.txt",
                       snapshotter="soci").stdout
        image_id = ctrd.cri_pull(f"{registry.host}/img:v1")   # CRI, namespace k8s.io
        print(ctrd.log())

What each instance gets, all under one fresh temporary directory (so leftovers of a crashed
run, or another containerd running at the same time, never collide with it):

* ``root``, ``state``, the gRPC socket ``address`` (ttrpc next to it), ``config.toml``,
  ``containerd.log`` (:meth:`Containerd.log`), a certs.d directory ``hosts_dir`` with a
  ``hosts.toml`` per plain-HTTP registry host (``127.0.0.1:PORT`` -> ``http://``);
* with ``soci_socket``: a ``[proxy_plugins.soci]`` snapshot proxy at that socket;
* the CRI image service using ``snapshotter`` (default ``"soci"`` with a soci socket,
  ``"overlayfs"`` without) with ``disable_snapshot_annotations = false``, so containerd adds the
  ``containerd.io/snapshot/cri.*`` labels a remote snapshotter needs; pulled images land in
  namespace ``k8s.io`` (:data:`CRI_NAMESPACE`);
* containers started through :meth:`Containerd.run` keep runc's state and their IO FIFOs
  under ``state`` (not in ``/run/containerd``), so a crash leaves nothing to find elsewhere.

:meth:`Containerd.stop` (also on exit) kills and deletes every task in every namespace, stops
the daemon, kills shims still serving its address, unmounts what is left under its
directories and deletes them. The daemon gets SIGKILL if the test process dies first.

Quirks found on these machines:

* 2.x enables NRI with a host-wide socket (``/var/run/nri/nri.sock``): disabled here, as two
  daemons would fight over it. 1.6 has no NRI.
* 2.x's CRI pulls through the transfer service unless ``use_local_image_pull = true``; the
  transfer service ignores ``disable_snapshot_annotations``, so remote snapshotters would get
  no CRI labels. Set explicitly here (2.x would also fall back by itself, with a warning).
* 2.x moved the CRI image settings to ``plugins."io.containerd.cri.v1.images"`` (snapshotter,
  annotations, registry ``config_path``) and runtime settings to ``io.containerd.cri.v1.runtime``.
* ctr 2.x's ``images pull`` and ``images import`` go through the transfer service unless given
  ``--local``; 1.6's ctr always pulls client-side.
* runc puts containers in the host-wide cgroup ``/<namespace>/<id>``: two daemons using the
  same namespace and container ID break each other ("cannot start an already running
  container"), hence a unique default namespace and unique IDs in :meth:`Containerd.run`.
* Shims outlive a killed daemon and keep sockets in ``/run/containerd/s`` (a sha256 of
  address/namespace/id, 2.x adds ``.../debug``); :meth:`Containerd.stop` removes both.
* CNI is not set up (an empty ``conf_dir``): containerd logs one error and runs on; CRI pulls
  need no network plugin, CRI sandboxes would.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

from podmanenv import unmount_all_under

#: The containerd generations the tests run against.
GENERATIONS = ("1.6", "2")
#: Where containerd's CRI plugin keeps what it pulls.
CRI_NAMESPACE = "k8s.io"
#: Seconds any one ctr command may take by default (test images are small).
DEFAULT_TIMEOUT = 120.0
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 15.0
_REPO = Path(__file__).resolve().parent.parent
_BUILD_2 = _REPO / ".build" / "containerd-2" / "usr" / "bin"
_SHIM_SOCKETS = Path("/run/containerd/s")


def binaries(generation: str) -> Path:
    """The directory holding ``containerd``, ``containerd-shim-runc-v2`` and ``ctr``.

    ``SOCI_CONTAINERD_1_6_BIN`` / ``SOCI_CONTAINERD_2_BIN`` override the defaults."""
    if generation == "1.6":
        return Path(os.environ.get("SOCI_CONTAINERD_1_6_BIN", "/usr/bin"))
    if generation == "2":
        return Path(os.environ.get("SOCI_CONTAINERD_2_BIN", str(_BUILD_2)))
    raise ValueError(f"unknown containerd generation {generation!r} (one of {GENERATIONS})")


def containerd_available(generation: str) -> str | None:
    """Why that containerd cannot run here, or ``None`` when it (probably) can."""
    if os.geteuid() != 0:
        return "containerd tests need root"
    bin_dir = binaries(generation)
    for tool in ("containerd", "containerd-shim-runc-v2", "ctr"):
        if not (bin_dir / tool).is_file():
            return f"{bin_dir / tool} missing (run ci/setup.sh)"
    if shutil.which("runc") is None:
        return "runc not found (Debian package runc)"
    proc = subprocess.run([str(bin_dir / "containerd"), "--version"], capture_output=True,
                          timeout=30, check=False, stdin=subprocess.DEVNULL)
    version = proc.stdout.decode(errors="replace").split()
    wanted = "1.6." if generation == "1.6" else "2."
    if proc.returncode != 0 or len(version) < 3 or not version[2].lstrip("v").startswith(wanted):
        return f"{bin_dir}/containerd is not containerd {generation}: {version}"
    return None


class CtrError(RuntimeError):
    """A ctr command failed: its arguments, status and output tails in one message."""

    def __init__(self, args: Sequence[str], proc: subprocess.CompletedProcess[str]) -> None:
        super().__init__(
            f"{' '.join(args)} exited with {proc.returncode}\nstdout: {proc.stdout[-2000:]}"
            f"\nstderr: {proc.stderr[-2000:]}")
        self.proc = proc


def _toml(value: str | os.PathLike[str]) -> str:
    """A TOML basic string (json.dumps escapes compatibly for the strings we write)."""
    return json.dumps(str(value))


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the test process dies (no orphan daemons)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Containerd:
    """One private containerd daemon; a context manager (see the module docstring).

    ``generation``: ``"1.6"`` or ``"2"``. ``soci_socket``: the proxy snapshotter's socket
    (registered as ``soci``). ``snapshotter``: what CRI pulls with. ``registry_hosts``:
    ``127.0.0.1:PORT`` hosts reached over plain HTTP (more with :meth:`add_registry_host`).
    ``namespace``: what :meth:`ctr` uses unless told otherwise (default: unique per
    instance, ``soci-test-<hex>``: see :meth:`run` on cgroups). ``workdir``: where the
    instance's directory goes (default: the system temp dir; keep it short, sockets live
    there). ``log_level``: containerd's (``debug`` shows snapshotter calls and labels).
    """

    def __init__(
        self,
        generation: str = "1.6",
        *,
        soci_socket: str | os.PathLike[str] | None = None,
        snapshotter: str | None = None,
        registry_hosts: Iterable[str] = (),
        namespace: str | None = None,
        workdir: str | os.PathLike[str] | None = None,
        log_level: str = "debug",
        extra_config: str = "",
    ) -> None:
        self.generation = generation
        self.bin_dir = binaries(generation)
        self.soci_socket = str(soci_socket) if soci_socket is not None else None
        self.snapshotter = snapshotter or ("soci" if soci_socket is not None else "overlayfs")
        # Unique by default: runc names a container's cgroup /<namespace>/<id>, shared by every
        # daemon on the host, so equal names in two concurrent tests would collide.
        self.namespace = namespace or f"soci-test-{uuid.uuid4().hex[:8]}"
        self.log_level = log_level
        self.extra_config = extra_config
        self.dir = Path(tempfile.mkdtemp(prefix="soci-ctrd-", dir=workdir))
        self.root = self.dir / "root"
        self.state = self.dir / "state"
        self.address = str(self.dir / "containerd.sock")
        self.hosts_dir = self.dir / "certs.d"
        self.config_path = self.dir / "config.toml"
        self.log_path = self.dir / "containerd.log"
        #: runc's state directory for containers started by :meth:`run`.
        self.runc_root = self.state / "runc"
        self._proc: subprocess.Popen[bytes] | None = None
        self._channel: object | None = None
        for host in registry_hosts:
            self.add_registry_host(host)

    # -- configuration --------------------------------------------------------------------

    def add_registry_host(self, host: str) -> None:
        """Let containerd (CRI, and ctr with ``--hosts-dir``) reach ``host`` over plain HTTP.

        containerd reads the hosts directory on every pull: this works while running."""
        name, _, port = host.rpartition(":")
        if name not in ("127.0.0.1", "localhost") or not port.isdigit():
            raise ValueError(f"only loopback registries (127.0.0.1:PORT), not {host!r}")
        directory = self.hosts_dir / host
        directory.mkdir(parents=True, exist_ok=True)
        url = f"http://{host}"
        (directory / "hosts.toml").write_text(
            f"server = {_toml(url)}\n\n[host.{_toml(url)}]\n"
            '  capabilities = ["pull", "resolve", "push"]\n  skip_verify = true\n')

    def _config(self) -> str:
        cni = self.dir / "cni"
        lines = [
            f"version = {2 if self.generation == '1.6' else 3}",
            f"root = {_toml(self.root)}",
            f"state = {_toml(self.state)}",
            "",
            "[grpc]",
            f"  address = {_toml(self.address)}",
            "[ttrpc]",
            f"  address = {_toml(self.address + '.ttrpc')}",
            "[debug]",
            f"  level = {_toml(self.log_level)}",
            "",
        ]
        if self.generation == "1.6":
            cri = 'plugins."io.containerd.grpc.v1.cri"'
            # Not configured here: "skip" in 2.x, an "error" line in 1.6's plugin list.
            lines.insert(3, 'disabled_plugins = ["io.containerd.snapshotter.v1.devmapper"]')
            lines += [
                f'[plugins."io.containerd.internal.v1.opt"]\n  path = {_toml(self.root / "opt")}',
                f"[{cri}]",
                '  stream_server_address = "127.0.0.1"\n  stream_server_port = "0"',
                "  enable_cdi = false",
                f"[{cri}.containerd]",
                f"  snapshotter = {_toml(self.snapshotter)}",
                "  disable_snapshot_annotations = false",
                f"[{cri}.cni]",
                f"  bin_dir = {_toml(cni / 'bin')}\n  conf_dir = {_toml(cni / 'conf')}",
                f"[{cri}.registry]",
                f"  config_path = {_toml(self.hosts_dir)}",
            ]
        else:
            images = 'plugins."io.containerd.cri.v1.images"'
            runtime = 'plugins."io.containerd.cri.v1.runtime"'
            lines += [
                f"[{images}]",
                f"  snapshotter = {_toml(self.snapshotter)}",
                "  disable_snapshot_annotations = false",
                "  use_local_image_pull = true",
                f"[{images}.registry]",
                f"  config_path = {_toml(self.hosts_dir)}",
                f"[{runtime}]",
                "  enable_cdi = false",
                f"[{runtime}.cni]",
                f"  bin_dirs = [{_toml(cni / 'bin')}]\n  conf_dir = {_toml(cni / 'conf')}",
                '[plugins."io.containerd.grpc.v1.cri"]',
                '  stream_server_address = "127.0.0.1"\n  stream_server_port = "0"',
                '[plugins."io.containerd.nri.v1.nri"]',
                "  disable = true",
            ]
        if self.soci_socket is not None:
            lines += ["", "[proxy_plugins.soci]", '  type = "snapshot"',
                      f"  address = {_toml(self.soci_socket)}"]
        return "\n".join(lines) + "\n" + self.extra_config

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Write the config and start the daemon; returns once it answers ``ctr version``."""
        if self._proc is not None:
            raise RuntimeError("containerd already started")
        for d in (self.root, self.state, self.hosts_dir, self.dir / "cni" / "bin",
                  self.dir / "cni" / "conf"):
            d.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._config())
        env = dict(os.environ)
        # The shim is found on PATH: this generation's first.
        env["PATH"] = f"{self.bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        # PDEATHSIG follows the forking *thread*: only tie the daemon to the main thread.
        on_main = threading.current_thread() is threading.main_thread()
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [str(self.bin_dir / "containerd"), "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                preexec_fn=_die_with_parent if on_main else None,
            )
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                status = self._proc.returncode
                self._proc = None
                raise RuntimeError(f"containerd {self.generation} exited with status {status}:"
                                   f"\n{self.log()[-3000:]}")
            if os.path.exists(self.address):
                proc = self.ctr("version", check=False, timeout=10)
                if proc.returncode == 0:
                    return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"containerd {self.generation} did not answer within "
                                   f"{_START_TIMEOUT}s:\n{self.log()[-3000:]}")
            time.sleep(0.1)

    def stop(self, *, remove: bool = True) -> None:
        """Kill all tasks, stop the daemon and its shims, unmount leftovers; with ``remove``
        delete the instance directory too. Safe to call twice."""
        if self._channel is not None:
            with contextlib.suppress(Exception):
                self._channel.close()  # type: ignore[attr-defined]
            self._channel = None
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(Exception):
                self._remove_tasks()
            self._proc.terminate()
            try:
                self._proc.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=_STOP_TIMEOUT)
        self._proc = None
        self._kill_shims()
        self._kill_runc_containers()
        left = unmount_all_under(self.dir)
        if remove and self.dir.exists():
            if left:
                raise RuntimeError(f"still mounted under {self.dir}: {left}")
            shutil.rmtree(self.dir, ignore_errors=True)

    def restart(self) -> None:
        """Stop (tasks killed, shims gone) and start again on the same root: images, content
        and committed snapshots stay; the config is rewritten (attributes may change)."""
        self.stop(remove=False)
        self.start()

    def __enter__(self) -> Containerd:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _remove_tasks(self) -> None:
        """Every task in every namespace: SIGKILL, then delete; containers too."""
        namespaces = self.ctr("namespaces", "ls", "-q", timeout=30).stdout.split()
        for ns in namespaces:
            for task in self.ctr("tasks", "ls", "-q", namespace=ns, timeout=30).stdout.split():
                self.ctr("tasks", "kill", "-s", "SIGKILL", task, namespace=ns, check=False,
                         timeout=30)
                self.ctr("tasks", "delete", "-f", task, namespace=ns, check=False, timeout=30)
            containers = self.ctr("containers", "ls", "-q", namespace=ns, timeout=30).stdout
            for container in containers.split():
                self.ctr("containers", "rm", container, namespace=ns, check=False, timeout=30)

    def _kill_shims(self) -> None:
        """Shims whose ``-address`` is this daemon's socket (they outlive the daemon), and
        the sockets they leave in ``/run/containerd/s`` (named by a hash of address,
        namespace and container ID, as both generations name them)."""
        for pid, argv in _processes_with_args("-address", self.address):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            options = dict(itertools.pairwise(argv))
            if "-namespace" in options and "-id" in options:
                key = os.path.join(self.address, options["-namespace"], options["-id"])
                for name in (key, key + "/debug"):  # 2.x: a debug socket with -debug
                    socket = _SHIM_SOCKETS / hashlib.sha256(name.encode()).hexdigest()
                    socket.unlink(missing_ok=True)

    def _kill_runc_containers(self) -> None:
        """Containers still alive in :attr:`runc_root` (a shim was killed under them)."""
        if not self.runc_root.is_dir():
            return
        for ns_dir in self.runc_root.iterdir():  # the shim adds the namespace to runc's root
            if not ns_dir.is_dir():
                continue
            for cid in os.listdir(ns_dir):
                subprocess.run(["runc", "--root", str(ns_dir), "delete", "-f", cid],
                               capture_output=True, timeout=30, check=False,
                               stdin=subprocess.DEVNULL)

    def log(self) -> str:
        """containerd's log so far (stdout and stderr)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- ctr --------------------------------------------------------------------------------

    def ctr(
        self,
        *args: str,
        check: bool = True,
        input: bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        namespace: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``ctr --address A --namespace N ARGS``; output decoded (UTF-8, replace).

        ``check`` raises :class:`CtrError` on a non-zero status. A timeout raises
        :class:`subprocess.TimeoutExpired` (the process is killed; :meth:`stop` cleans up)."""
        command = [str(self.bin_dir / "ctr"), "--address", self.address,
                   "--namespace", namespace or self.namespace, *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD_")}
        proc = subprocess.run(command, input=input, capture_output=True, timeout=timeout,
                              check=False, env=env, stdin=None if input is not None
                              else subprocess.DEVNULL)
        done = subprocess.CompletedProcess(
            command, proc.returncode, proc.stdout.decode(errors="replace"),
            proc.stderr.decode(errors="replace"))
        if check and done.returncode != 0:
            raise CtrError(command, done)
        return done

    def run(
        self,
        image: str,
        *cmd: str,
        snapshotter: str | None = None,
        container_id: str | None = None,
        args: Sequence[str] = (),
        detach: bool = False,
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        namespace: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``ctr run --rm [--snapshotter S] IMAGE ID CMD...`` with a unique container ID
        (default) and runc state under :attr:`runc_root`; ``args`` go before IMAGE.

        runc puts the container in the host-wide cgroup ``/<namespace>/<id>``: an ID reused
        in the same namespace by another daemon (say ``k8s.io``, where CRI pulls land) makes
        runc refuse to start it, or kill both. Keep IDs unique (the default does).

        ``detach`` runs ``ctr run -d`` instead of ``--rm``: the task keeps running (and its
        snapshots stay) until killed; :meth:`stop` kills it (pass ``container_id`` to
        address it yourself)."""
        cid = container_id or f"soci-test-{uuid.uuid4().hex[:12]}"
        options = ["-d" if detach else "--rm", "--runc-root", str(self.runc_root),
                   "--fifo-dir", str(self.state / "fifo")]
        if snapshotter is not None:
            options += ["--snapshotter", snapshotter]
        return self.ctr("run", *options, *args, image, cid, *cmd, check=check,
                        timeout=timeout, namespace=namespace)

    def import_layout(self, layout: str | os.PathLike[str], name: str, *,
                      snapshotter: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> str:
        """``ctr images import`` of an OCI layout directory (tarred here) under ``name``;
        each ``org.opencontainers.image.ref.name`` tag T becomes ``name:T``. Returns the
        first such image name."""
        layout = Path(layout)
        index = json.loads((layout / "index.json").read_text())
        tags = [m.get("annotations", {}).get("org.opencontainers.image.ref.name")
                for m in index.get("manifests", [])]
        tags = [t for t in tags if t]
        if not tags:
            raise ValueError(f"{layout}/index.json names no tag")
        archive = self.dir / f"import-{uuid.uuid4().hex[:8]}.tar"
        try:
            with tarfile.open(archive, "w") as tar:
                for entry in sorted(os.listdir(layout)):
                    tar.add(layout / entry, arcname=entry)
            options = ["--base-name", name]
            if snapshotter is not None:
                options += ["--snapshotter", snapshotter]
            self.ctr("images", "import", *options, str(archive), timeout=timeout)
        finally:
            archive.unlink(missing_ok=True)
        return f"{name}:{tags[0]}"

    # -- CRI image service --------------------------------------------------------------------

    def _cri(self):  # -> cri.api_pb2_grpc.ImageServiceStub
        import grpc

        from cri import api_pb2_grpc

        if self._channel is None:
            self._channel = grpc.insecure_channel(f"unix://{self.address}")
        return api_pb2_grpc.ImageServiceStub(self._channel)

    def cri_pull(self, image: str, *, annotations: dict[str, str] | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> str:
        """A kubelet-style CRI ``PullImage``; returns the image ref containerd answers (the
        image ID, ``sha256:`` of its config). Pulls go to namespace ``k8s.io`` with the
        configured :attr:`snapshotter`. Raises :class:`grpc.RpcError` on failure."""
        from cri import api_pb2

        spec = api_pb2.ImageSpec(image=image, annotations=annotations or {})
        reply = self._cri().PullImage(api_pb2.PullImageRequest(image=spec), timeout=timeout)
        return str(reply.image_ref)

    def cri_status(self, image: str, *, timeout: float = 30.0):  # -> api_pb2.Image | None
        """CRI ``ImageStatus``: the image (id, repo_tags, repo_digests, size) or ``None``."""
        from cri import api_pb2

        reply = self._cri().ImageStatus(
            api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=image)), timeout=timeout)
        return reply.image if reply.HasField("image") else None

    def cri_list(self, *, timeout: float = 30.0) -> list:  # -> list[api_pb2.Image]
        """CRI ``ListImages`` (no filter)."""
        from cri import api_pb2

        return list(self._cri().ListImages(api_pb2.ListImagesRequest(), timeout=timeout).images)

    def cri_remove(self, image: str, *, timeout: float = 30.0) -> None:
        """CRI ``RemoveImage`` (idempotent, as the CRI defines it)."""
        from cri import api_pb2

        self._cri().RemoveImage(
            api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=image)), timeout=timeout)


def _processes_with_args(flag: str, value: str) -> list[tuple[int, list[str]]]:
    """(pid, argv) of processes whose argv has ``flag`` immediately followed by ``value``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        argv = [a.decode(errors="replace") for a in raw.split(b"\0")]
        if any(argv[i] == flag and argv[i + 1] == value for i in range(len(argv) - 1)):
            found.append((int(entry), argv))
    return found
